"""streamd: move events from Redis Streams into PostgreSQL, exactly once.

The public Python API is imported lazily, so `streamd` commands that do not need it start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamd.client.producer import (
        BacklogFull,
        InvalidEvent,
        PartialBatch,
        Producer,
        ProducerError,
        SyncProducer,
    )

_EXPORTS = {
    "Producer": "streamd.client.producer",
    "SyncProducer": "streamd.client.producer",
    "ProducerError": "streamd.client.producer",
    "InvalidEvent": "streamd.client.producer",
    "BacklogFull": "streamd.client.producer",
    "PartialBatch": "streamd.client.producer",
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
