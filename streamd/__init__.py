"""streamd: move events from Redis Streams into PostgreSQL, exactly once.

The public Python API is imported lazily, so `streamd` commands that do not need it start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamd.producer import (
        BacklogFull,
        InvalidEvent,
        PartialBatch,
        Producer,
        ProducerError,
        SyncProducer,
    )

_EXPORTS = {
    "Producer": "streamd.producer",
    "SyncProducer": "streamd.producer",
    "ProducerError": "streamd.producer",
    "InvalidEvent": "streamd.producer",
    "BacklogFull": "streamd.producer",
    "PartialBatch": "streamd.producer",
}

__all__ = [
    "BacklogFull",
    "InvalidEvent",
    "PartialBatch",
    "Producer",
    "ProducerError",
    "SyncProducer",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'streamd' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
