"""The Producer API's original path: `from streamd.producer import Producer` keeps working."""

from streamd.client.producer import (
    BacklogFull,
    InvalidEvent,
    PartialBatch,
    Producer,
    ProducerError,
    SyncProducer,
)

__all__ = [
    "BacklogFull",
    "InvalidEvent",
    "PartialBatch",
    "Producer",
    "ProducerError",
    "SyncProducer",
]
