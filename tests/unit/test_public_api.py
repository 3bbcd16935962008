"""The public Python API keeps its import paths across the package's layout."""

from __future__ import annotations

import streamd
import streamd.client.producer as client_producer
import streamd.producer as old_producer_path
from streamd.monitor import Monitor
from streamd.observability.monitor import Monitor as ObservabilityMonitor

PUBLIC = (
    "Producer",
    "SyncProducer",
    "BacklogFull",
    "InvalidEvent",
    "PartialBatch",
    "ProducerError",
)


def test_the_package_exports_the_producer_api() -> None:
    assert sorted(streamd.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(streamd, name) is getattr(client_producer, name)


def test_the_original_module_paths_stay_importable() -> None:
    assert sorted(old_producer_path.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(old_producer_path, name) is getattr(client_producer, name)
    assert Monitor is ObservabilityMonitor
