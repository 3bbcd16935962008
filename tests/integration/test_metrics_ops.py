"""The metrics operators alert on: lag and pending age in seconds (read from entry IDs, on Redis'
clock), streamd_postgres_up, streamd_build_info, and dead letters by reason and stream, exported
at 0 from the start so that the first one is an increase."""

from __future__ import annotations

import asyncio
import importlib.metadata
import platform
import socket
import time
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamd.backends.connections import redis_client
from streamd.config.settings import Settings
from streamd.dev.servers import PostgresServer
from streamd.observability.redis_stats import read_backlog_ages, read_redis_stats
from streamd.pipeline.envelope import DEAD_LETTER_REASONS
from tests.support.helpers import ServeProcess, event, wait_until, xadd
from tests.support.helpers import redis_client as sync_redis

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def ages_of(settings: Settings) -> tuple[float, float]:
    client = redis_client(settings)
    try:
        stats = await read_redis_stats(client, settings)
        ages = await read_backlog_ages(client, settings, stats)
    finally:
        await client.aclose()
    assert ages is not None
    return ages.lag_s, ages.pending_age_s


def test_lag_and_pending_age_come_from_the_entry_ids(settings: Settings) -> None:
    with sync_redis(settings.redis_url) as r:
        r.xgroup_create("events", "streamd", id="0", mkstream=True)
        assert asyncio.run(ages_of(settings)) == (0.0, 0.0)  # nothing to do: 0, not absent
        now_ms = int(r.time()[0]) * 1000
        # Entries produced 300 s, 200 s and 100 s ago (explicit IDs, as a replayed log would).
        for age_s in (300, 200, 100):
            r.xadd("events", {"type": "t", "data": "{}"}, id=f"{now_ms - age_s * 1000}-0")
        r.xreadgroup("streamd", "c1", {"events": ">"}, count=1)  # the oldest is now pending
        lag_s, pending_s = asyncio.run(ages_of(settings))
        assert 199 <= lag_s <= 205  # the oldest not yet delivered: 200 s old
        assert 299 <= pending_s <= 305
        r.xreadgroup("streamd", "c1", {"events": ">"})
        lag_s, pending_s = asyncio.run(ages_of(settings))
        assert lag_s == 0.0 and 299 <= pending_s <= 305
        ids = [e[0] for e in r.xrange("events")]
        r.xack("events", "streamd", *ids)
        assert asyncio.run(ages_of(settings)) == (0.0, 0.0)


def test_serve_exports_postgres_up_build_info_and_every_dead_letter_reason(
    env: dict[str, str],
    settings: Settings,
    make_postgres: Callable[..., PostgresServer],
    start_serve: Callable[..., ServeProcess],
) -> None:
    pg = make_postgres()
    port = free_port()
    environ = env | {"STREAMD_METRICS_PORT": str(port), "STREAMD_POSTGRES_DSN": pg.dsn}
    serve = start_serve(environ=environ)
    serve.wait_ready(1)
    page = wait_until(lambda: scrape(port), timeout=30, ignore=(OSError,))
    assert page["streamd_postgres_up"] == 1
    info = [k for k in page if k.startswith("streamd_build_info{")]
    version = importlib.metadata.version("streamd")
    python = platform.python_version()
    assert info == [f'streamd_build_info{{python="{python}",version="{version}"}}']
    for reason in DEAD_LETTER_REASONS:
        assert page[f'streamd_dead_letters_total{{reason="{reason}",stream="events"}}'] == 0
    group = '{group="streamd",stream="events"}'
    assert page[f"streamd_consumer_lag_seconds{group}"] == 0
    assert page[f"streamd_pending_age_seconds{group}"] == 0

    pg.kill()
    xadd(settings.redis_url, [event("t", {"i": i}) for i in range(10)])
    time.sleep(1.5)  # the entries wait, held by a consumer that cannot commit

    def down() -> dict[str, float] | None:
        page = scrape(port)
        held = page.get(f"streamd_pending_age_seconds{group}", 0) >= 1
        return page if page["streamd_postgres_up"] == 0 and held else None

    page = wait_until(down, timeout=30)
    assert page["streamd_redis_up"] == 1
    pg.start()
    wait_until(lambda: scrape(port)["streamd_postgres_up"] == 1, timeout=60)
    wait_until(lambda: scrape(port)[f"streamd_pending_age_seconds{group}"] == 0, timeout=60)
