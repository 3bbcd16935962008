"""Chaos, long: `streamd serve` under a fixed-rate producer while faults are injected for as long
as you like, then the exactly-once check by entry ID and payload key (tests/support/chaos.py has the
driver and the list of faults; tests/faults/test_chaos.py is the short run in the suite).

    uv run python bench/chaos.py                        # 5 minutes, 500 events/s, 2 workers
    uv run python bench/chaos.py --duration 1800 --rate 2000 --procs 4 --mean-gap 1
    uv run python bench/chaos.py --seed 1074443803      # replay a run's fault sequence
    uv run python bench/chaos.py --faults kill_worker,redis_kill --json

It starts its own Redis (AOF, appendfsync always) and PostgreSQL on free loopback ports under a
temporary directory (kept with --keep, for the logs), prints each fault as it is injected and the
figures at the end, and exits 0 when every event landed exactly once, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the driver lives with the tests

from streamd.dev.servers import PostgresServer, RedisServer  # noqa: E402
from tests.support.chaos import FAULTS, Chaos, ChaosConfig, Figures  # noqa: E402
from tests.support.helpers import ServeProcess  # noqa: E402

_FOREIGN = ("STREAMD_", "POSTGRES_", "REDIS_", "NOTIFY_SOCKET", "WATCHDOG_", "RUNTIME_DIRECTORY")
_SEED_NAMES = {
    "NUM_WORKERS",
    "BATCH_SIZE",
    "BATCH_TIMEOUT_SECONDS",
    "XREAD_COUNT",
    "XREAD_BLOCK_MS",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of faults (300)")
    p.add_argument("--rate", type=float, default=500.0, help="events per second (500)")
    p.add_argument("--procs", type=int, default=2, help="worker processes (2)")
    p.add_argument("--mean-gap", type=float, default=1.5, help="mean seconds between faults")
    p.add_argument("--seed", type=int, default=None, help="fault sequence seed (random)")
    p.add_argument("--faults", default=",".join(FAULTS), help="comma-separated subset of faults")
    p.add_argument("--keep", action="store_true", help="keep the data and logs directory")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = p.parse_args(argv)
    unknown = set(args.faults.split(",")) - set(FAULTS)
    if unknown:
        p.error(f"unknown faults {sorted(unknown)}; known: {', '.join(FAULTS)}")
    return args


def base_env(root: Path) -> dict[str, str]:
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN) and k not in _SEED_NAMES
    }
    (root / "empty.toml").write_text("")
    return environ | {
        "STREAMD_CONFIG": str(root / "empty.toml"),
        "STREAMD_LOG_FORMAT": "json",
        "STREAMD_STATE_DIR": str(root / "state"),
    }


def as_json(figures: Figures) -> str:
    o = figures.outcome
    return json.dumps(
        {
            "ok": figures.ok(),
            "seed": figures.seed,
            "duration_s": round(figures.duration_s, 1),
            "faults": dict(figures.faults),
            "produced": o.produced if o else None,
            "rows": o.rows if o else None,
            "lost": len(o.lost) if o else None,
            "duplicated": o.duplicated if o else None,
            "unexpected": len(o.unexpected) if o else None,
            "dlq_rows": o.dead_rows if o else None,
            "dlq_stream": o.dead_stream if o else None,
            "pending": o.pending if o else None,
            "producer_retries": figures.producer_retries,
            "child_restarts": figures.child_restarts,
            "supervisor_alive": figures.supervisor_alive,
            "serve_exit": figures.serve_exit,
            "worker_crashes": len(figures.crashes),
            "unparsable_log_lines": len(figures.bad_log_lines),
        }
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="streamd-chaos-"))
    root.chmod(0o711)  # PostgreSQL runs as another user when we are root
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    redis = RedisServer(root / "redis", appendfsync="always")
    postgres = PostgresServer(root / "postgres", fsync=False)  # process kills lose nothing
    serves: list[ServeProcess] = []

    def start_serve(environ: dict[str, str]) -> ServeProcess:
        serves.append(ServeProcess(environ, log_dir=root / "logs"))
        return serves[-1]

    config = ChaosConfig(
        duration_s=args.duration,
        rate=args.rate,
        procs=args.procs,
        mean_gap_s=args.mean_gap,
        seed=args.seed,
        faults=tuple(args.faults.split(",")),
    )
    try:
        redis.start()
        postgres.start()
        say(f"chaos: {args.duration:g} s, {args.rate:g} events/s, {args.procs} workers; {root}")
        figures = Chaos(redis, postgres, start_serve, base_env(root), config, say=say).run()
    finally:
        for serve in serves:
            serve.close()
        postgres.kill()
        redis.kill()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(as_json(figures) if args.json else figures.report())
    return 0 if figures.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
