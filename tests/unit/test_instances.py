"""Instance ids and liveness key names (common/instances.py, worker/liveness.py): unique per
serve, readable, and a consumer's name leads back to its worker's key."""

from __future__ import annotations

import re
import socket

from streamd.common.instances import new_instance_id
from streamd.config.settings import Settings
from streamd.worker.liveness import liveness_key, owner_of, worker_prefix


def test_instance_ids_are_the_hostname_and_a_random_part() -> None:
    ids = {new_instance_id() for _ in range(50)}
    assert len(ids) == 50
    host = re.sub(r"[^A-Za-z0-9_.\-]", "-", socket.gethostname())
    assert all(re.fullmatch(rf"{re.escape(host)}-[0-9a-f]{{8}}", i) for i in ids)


def test_a_consumer_leads_to_its_workers_liveness_key() -> None:
    settings = Settings(instance_id="web-1", group="ingest")
    prefix = worker_prefix(settings)
    assert prefix.startswith("web-1:") and prefix.split(":")[1].isdigit()
    assert owner_of(f"{prefix}:3") == owner_of(f"{prefix}:reaper") == prefix
    assert liveness_key("ingest", prefix) == f"streamd:live:ingest:{prefix}"
    # An instance id with a colon still splits at the task only.
    assert owner_of("a:b:1234:0") == "a:b:1234"
