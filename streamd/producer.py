"""The Producer API's original path: `from streamd.producer import Producer` keeps working."""

from streamd import __all__ as __all__
from streamd.client.producer import BacklogFull as BacklogFull
from streamd.client.producer import InvalidEvent as InvalidEvent
from streamd.client.producer import PartialBatch as PartialBatch
from streamd.client.producer import Producer as Producer
from streamd.client.producer import ProducerError as ProducerError
from streamd.client.producer import SyncProducer as SyncProducer
