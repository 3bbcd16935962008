"""Scrape-time metrics of many streams: every configured stream (names, and patterns resolved in
Redis) gets its length, dead-stream length, lag and pending, labelled with its name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamd.config.settings import Settings
from streamd.observability.metrics import PipelineCollector
from tests.support.helpers import event, xadd
from tests.support.helpers import redis_client as sync_redis

pytestmark = pytest.mark.timeout(60)


def collect(settings: Settings, tmp_path: Path) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(PipelineCollector(settings, tmp_path / "no-status.json"))
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_every_configured_stream_is_labelled(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(streams="orders,tenant:*,missing")
    url = settings.redis_url
    xadd(url, [event("o", {"i": i}) for i in range(5)], stream="orders")
    xadd(url, [event("t", {"i": i}) for i in range(3)], stream="tenant:a")
    xadd(url, [event("t", {"i": i}) for i in range(2)], stream="tenant:b")
    xadd(url, [{"data": "{}"}], stream="tenant:b:dead")  # a dead stream: never a stream of its own
    with sync_redis(url) as r:
        r.rpush("tenant:list", "x")  # matches the pattern, is not a stream: skipped
        r.xgroup_create("orders", "streamd", id="0")  # 5 to deliver
        r.xgroup_create("tenant:a", "streamd", id="$")  # nothing to deliver
        r.xreadgroup("streamd", "c1", {"tenant:a": ">"})  # nothing: no pending either
        xadd(url, [event("t", {"i": 9})], stream="tenant:a")
        r.xreadgroup("streamd", "c1", {"tenant:a": ">"}, count=1)  # 1 pending
    page = collect(settings, tmp_path)

    assert page["streamd_streams"] == 4  # orders, tenant:a, tenant:b, missing
    length = "streamd_stream_length"
    assert page[f'{length}{{stream="orders"}}'] == 5
    assert page[f'{length}{{stream="tenant:a"}}'] == 4
    assert page[f'{length}{{stream="tenant:b"}}'] == 2
    assert page[f'{length}{{stream="missing"}}'] == 0
    assert f'{length}{{stream="tenant:list"}}' not in page
    assert f'{length}{{stream="tenant:b:dead"}}' not in page
    assert page['streamd_dead_stream_length{stream="tenant:b:dead"}'] == 1
    assert page['streamd_dead_stream_length{stream="orders:dead"}'] == 0
    group = 'group="streamd",stream='
    assert page[f'streamd_consumer_lag{{{group}"orders"}}'] == 5
    assert page[f'streamd_pending_entries{{{group}"orders"}}'] == 0
    assert page[f'streamd_consumer_lag{{{group}"tenant:a"}}'] == 0
    assert page[f'streamd_pending_entries{{{group}"tenant:a"}}'] == 1
    assert page[f'streamd_pending_age_seconds{{{group}"tenant:a"}}'] >= 0
    assert page[f'streamd_consumer_lag_seconds{{{group}"orders"}}'] >= 0
    # No group yet: lag and pending unknown, so absent rather than 0.
    assert f'streamd_consumer_lag{{{group}"tenant:b"}}' not in page
    assert page["streamd_redis_up"] == 1
