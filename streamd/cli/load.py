"""`streamd produce` and `streamd bench`: sample events and the end-to-end benchmark."""

from __future__ import annotations

import sys

import click

from streamd.cli.app import Context, cli, configured, round_trip_batch, run

BENCH_TABLE = "bench_events"  # the stream and table of `bench --serve`


@cli.command()
@click.argument("count", type=click.IntRange(1), metavar="N")
@click.option(
    "--rate",
    type=click.FloatRange(0, min_open=True),
    metavar="R",
    show_default="as fast as possible",
    help="Events per second.",
)
@round_trip_batch(default=500)
@click.option(
    "--type",
    "event_type",
    metavar="T",
    show_default="all five, mixed",
    help="Only this sample type: user_created, order_placed, payment_processed, "
    "product_viewed, order_shipped.",
)
@click.pass_context
def produce(
    ctx: click.Context, count: int, rate: float | None, batch_size: int, event_type: str | None
) -> None:
    """Produce N sample events to the stream (waits while the backlog is above max_backlog).

    Examples:

    \b
      streamd produce 5000
      streamd produce 100000 --rate 2000 --type order_placed
    """
    import uvloop

    from streamd.tools.samples import produce_samples

    def body() -> None:
        settings = configured(ctx)
        uvloop.run(
            produce_samples(
                settings, count, rate=rate, batch_size=batch_size, event_type=event_type
            )
        )

    run(body)


@cli.command()
@click.option("--rate", type=click.FloatRange(0, min_open=True), metavar="R", help="Events/s.")
@click.option(
    "--duration",
    "duration_s",
    type=click.FloatRange(0, min_open=True),
    metavar="D",
    help="Seconds.",
)
@click.option(
    "--drain", type=click.IntRange(1), metavar="N", help="Instead: pre-fill N, time the drain."
)
@click.option(
    "--serve",
    "own_serve",
    is_flag=True,
    help="Start (and stop) a serve of its own, on a stream and table of its own (--table).",
)
@click.option(
    "--table",
    metavar="NAME",
    show_default=f"{BENCH_TABLE}, with --serve",
    help="With --serve: the stream and events table of the run (dead letters: NAME_dead).",
)
@click.option(
    "--procs", type=click.IntRange(1, 256), default=1, show_default=True, help="With --serve."
)
@click.option(
    "--streams",
    "n_streams",
    type=click.IntRange(1, 1000),
    default=1,
    metavar="N",
    help="Spread the events over N streams, each checked on its own. With --serve: "
    "NAME:0 .. NAME:N-1 (NAME: --table's); else the first N names in `streams`.",
)
@round_trip_batch(default=1000)
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0),
    default=60.0,
    show_default=True,
    metavar="S",
    help="Give up waiting for rows after S seconds without progress.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (progress: stderr).")
@click.pass_context
def bench(
    ctx: click.Context,
    rate: float | None,
    duration_s: float | None,
    drain: int | None,
    own_serve: bool,
    table: str | None,
    procs: int,
    n_streams: int,
    batch_size: int,
    wait_s: float,
    as_json: bool,
) -> None:
    """End-to-end benchmark: rate accuracy, latency percentiles, exactly-once check.

    Either --rate R --duration D, or --drain N. Against a running serve (its stream and table:
    the header says which), or --serve, which runs one of its own on a stream and table of its
    own. Exits 1 if any event was lost or duplicated.

    Examples:

    \b
      streamd bench --rate 5000 --duration 10 --serve
      streamd bench --drain 100000 --serve --procs 2 --json
      streamd bench --drain 100000 --serve --streams 10
      streamd bench --rate 1000 --duration 30
    """
    import uvloop

    from streamd.config.tables import is_pattern
    from streamd.tools.bench import BenchPlan, run_bench

    if drain is None and (rate is None or duration_s is None):
        raise click.UsageError("give --rate R and --duration D, or --drain N")
    if drain is not None and (rate is not None or duration_s is not None):
        raise click.UsageError("--drain N cannot be combined with --rate/--duration")
    obj: Context = ctx.obj
    if table is not None and not own_serve:
        raise click.UsageError(
            "--table needs --serve: a running serve writes where its own config says "
            "(point bench at the same stream and table with --set stream=... "
            "--set events_table=...)"
        )
    streams: list[str] = []
    if own_serve:
        # Its own stream and tables: a serve of production never sees the bench's events, and
        # the bench's serve never takes production's.
        name = table or BENCH_TABLE
        obj.overrides |= {
            "stream": name,
            "events_table": name,
            "dlq_table": f"{name}_dead",
            "dlq_stream": "",
        }
        if n_streams > 1:
            streams = [f"{name}:{i}" for i in range(n_streams)]
            # Every one of them into the bench's table: no routing of the config applies.
            obj.overrides |= {"streams": ",".join(streams), "tables": ""}
    global_args = ["--config", obj.config_file] if obj.config_file else []
    for key, value in obj.overrides.items():
        global_args += ["--set", f"{key}={value}"]
    plan = BenchPlan(
        rate=rate,
        duration_s=duration_s,
        drain=drain,
        batch_size=batch_size,
        serve_procs=procs if own_serve else None,
        wait_s=wait_s,
        global_args=global_args,
    )

    def body() -> None:
        settings = configured(ctx)
        if n_streams > 1 and not own_serve:
            named = [n for n in settings.streams if not is_pattern(n)]
            if len(named) < n_streams:
                raise click.UsageError(
                    f"--streams {n_streams} without --serve writes to the running serve's "
                    f"streams: the config's `streams` names {len(named)} "
                    "(patterns do not count); name more, or use --serve"
                )
            streams[:] = named[:n_streams]
        plan.streams = streams
        sys.exit(uvloop.run(run_bench(settings, plan, as_json=as_json)))

    run(body)
