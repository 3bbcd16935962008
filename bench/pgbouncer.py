"""What PgBouncer in front of Postgres costs streamd: the same pre-filled stream drained by
`streamd serve` straight into Postgres (the baseline) and through a private PgBouncer in session
and in transaction pooling mode, side by side, on the same private Redis and Postgres.

    uv run python -m bench.pgbouncer                    # 200,000 events, 3 runs each
    uv run python -m bench.pgbouncer --events 50000 --repeat 1

Behind a pooler streamd cannot keep timeouts in the session: every batch becomes a transaction
that starts with SET LOCAL (BEGIN, SET LOCAL, COPY, COMMIT instead of one autocommit COPY), and
asyncpg keeps no prepared statement. The table shows the median drain rate of each and its ratio
to the direct one. (PgBouncer is the Debian package, installed when missing and run as root.)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys

import orjson

from bench.run import WORK, Lab
from streamd.dev.pgbouncer import PgBouncerServer


def drain_rate(lab: Lab, dsn: str, events: int, procs: int) -> float:
    """One drain of a fresh stream of `events` through `dsn`: events/s from the first to the last
    commit, checked exactly once."""
    lab.reset()
    env = lab.env(STREAMD_POSTGRES_DSN=dsn)
    argv = ["--drain", str(events), "--serve", "--procs", str(procs), "--json"]
    out = subprocess.run(
        [sys.executable, "-m", "streamd", "bench", *argv],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"bench through {dsn} failed (exit {out.returncode}): {out.stderr[-800:]}")
    result = orjson.loads(out.stdout.splitlines()[-1])
    if not result["exactly_once"]:
        raise SystemExit(f"not exactly once through {dsn}: {result}")
    return float(result["consumer_throughput"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--procs", type=int, default=1)
    args = parser.parse_args()
    with Lab.open(None, None) as lab:
        pg = lab.servers[1]
        bouncers = {}
        for mode in ("session", "transaction"):
            shutil.rmtree(WORK / f"pgbouncer-{mode}", ignore_errors=True)
            bouncer = PgBouncerServer(
                WORK / f"pgbouncer-{mode}",
                backend_port=pg.port,
                pool_mode="session" if mode == "session" else "transaction",
            )
            bouncers[mode] = bouncer.start()
        try:
            targets = {"direct": lab.dsn} | {
                f"pgbouncer {mode}": b.dsn() for mode, b in bouncers.items()
            }
            rates: dict[str, list[float]] = {name: [] for name in targets}
            for run in range(args.repeat):
                for name, dsn in targets.items():  # interleaved: drift hits all alike
                    rates[name].append(drain_rate(lab, dsn, args.events, args.procs))
                    print(f"run {run + 1}: {name}: {rates[name][-1]:,.0f} events/s", flush=True)
        finally:
            for bouncer in bouncers.values():
                bouncer.stop()
    base = statistics.median(rates["direct"])
    print(f"\n{args.events:,} events, {args.procs} worker process(es), median of {args.repeat}")
    print(f"{'path':<24}{'events/s':>12}{'vs direct':>12}")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:<24}{median:>12,.0f}{median / base:>12.2f}")


if __name__ == "__main__":
    main()
