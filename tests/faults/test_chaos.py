"""Chaos, short: `streamd serve` (two workers) under a steady producer for about a minute while
workers are SIGKILLed, Postgres and Redis are restarted and killed, and the network paths to
both are cut, refused and stalled (tests/support/chaos.py). Then, compared by entry ID and by
payload key:
every produced event exactly once in Postgres, nothing pending, nothing dead-lettered, the
supervisor still running and stopping cleanly, every log line whole JSON.

    uv run pytest -m chaos -s          # just this, with its figures
    uv run python bench/chaos.py ...   # the long run (see there)

A failure prints the seed; STREAMD_CHAOS_SEED=<seed> replays the same fault sequence.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from streamd.dev.servers import PostgresServer, RedisServer
from tests.support.chaos import Chaos, ChaosConfig
from tests.support.helpers import ServeProcess

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


def test_chaos_every_event_exactly_once(
    env: dict[str, str],
    make_redis: Callable[..., RedisServer],
    make_postgres: Callable[..., PostgresServer],
    start_serve: Callable[..., ServeProcess],
) -> None:
    seed = os.environ.get("STREAMD_CHAOS_SEED")
    config = ChaosConfig(
        duration_s=float(os.environ.get("STREAMD_CHAOS_DURATION_S", "45")),
        seed=int(seed) if seed else None,
    )
    chaos = Chaos(
        make_redis(),  # AOF with appendfsync always: a kill loses no acknowledged XADD
        make_postgres(),
        lambda environ: start_serve(environ=environ),
        env,
        config,
        say=print,
    )
    figures = chaos.run()
    print(figures.report())
    assert figures.ok(), (
        f"{figures.report()}\nlost e.g. {figures.outcome.lost[:5] if figures.outcome else ''}\n"
        f"bad log lines e.g. {figures.bad_log_lines[:3]}\ncrashes: {figures.crashes[:2]}\n"
        + (chaos.serve.tail(40) if chaos.serve else "")
    )
    assert sum(figures.faults.values()) >= 10
