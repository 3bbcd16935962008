"""The monitor API's original import path: `from streamd.monitor import Monitor` keeps working."""

from streamd.observability.monitor import Monitor, Snapshot

__all__ = ["Monitor", "Snapshot"]
