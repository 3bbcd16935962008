"""What serve derives from `streams`: each stream's dead stream, the tables to create, and the
Redis ACL needs of names and patterns."""

from __future__ import annotations

from pathlib import Path

from streamd.config import Settings, load_settings
from streamd.worker.redis_needs import serve_needs


def load(tmp_path: Path, toml: str = "", **env: str) -> Settings:
    path = tmp_path / "streamd.toml"
    path.write_text(toml)
    return load_settings(config_file=str(path), environ=env)[0]


def test_dlq_stream_names_only_the_single_streams_dead_stream(tmp_path: Path) -> None:
    single = load(tmp_path, STREAMD_DLQ_STREAM="graveyard")
    assert single.dead_stream_for("events") == "graveyard"
    many = load(tmp_path, STREAMD_STREAMS="events,orders", STREAMD_DLQ_STREAM="graveyard")
    assert many.dead_stream_for("events") == "events:dead"
    assert many.dead_stream_for("orders") == "orders:dead"
    assert load(tmp_path).dead_stream_for("events") == "events:dead"


def test_every_routed_table_is_created_once(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        STREAMD_TABLES="orders=orders_events,tenant:*=tenant_events,vip=orders_events",
        STREAMD_EVENTS_TABLE="events",
    )
    assert s.table_names == ("events", "orders_events", "tenant_events")
    assert load(tmp_path).table_names == ("events",)


def test_serve_needs_cover_each_name_and_pattern_and_scan_for_patterns(tmp_path: Path) -> None:
    plain = {(n.command, n.key) for n in serve_needs(load(tmp_path))}
    assert ("xreadgroup", "events") in plain and ("scan", None) not in plain
    s = load(tmp_path, STREAMD_STREAMS="orders,tenant:*")
    needs = {(n.command, n.key) for n in serve_needs(s)}
    assert {("xreadgroup", "orders"), ("xreadgroup", "tenant:*"), ("scan", None)} <= needs
    assert ("evalsha", "tenant:*:dead") in needs
    assert ("xreadgroup", "events") not in needs
