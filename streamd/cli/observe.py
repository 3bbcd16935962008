"""`streamd monitor` and `streamd logs`: the dashboard and the log viewer."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import click

from streamd.cli.app import cli, configured, run


@cli.command()
@click.option(
    "--interval",
    "interval_s",
    type=click.FloatRange(0.1),
    default=5.0,
    show_default=True,
    metavar="S",
    help="Seconds between refreshes.",
)
@click.option(
    "--once",
    is_flag=True,
    help="Print one frame and exit: 1 if Redis or Postgres failed, or a named stream is missing.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per refresh.")
@click.pass_context
def monitor(ctx: click.Context, interval_s: float, once: bool, as_json: bool) -> None:
    """The pipeline dashboard: a line per configured stream (length, lag, pending, rate, DLQ),
    totals over those streams only, latency, dead letters by reason, serve processes.

    Examples:

    \b
      streamd monitor
      streamd monitor --once
      streamd --set streams=orders,tenant:* monitor --interval 1 --json
    """
    from streamd.observability.dashboard import run_monitor

    def body() -> None:
        settings = configured(ctx)
        try:
            code = asyncio.run(
                run_monitor(settings, interval_s=interval_s, once=once, as_json=as_json)
            )
        except KeyboardInterrupt:
            code = 0  # Ctrl-C is how a dashboard is closed
        sys.exit(code)

    run(body)


@cli.command()
@click.argument("file", required=False, metavar="[FILE]")
@click.option("-f", "--follow", is_flag=True, help="Keep reading as FILE grows (across rotation).")
@click.option(
    "-n",
    "--lines",
    "last",
    type=click.IntRange(0),
    metavar="N",
    show_default="all; 10 with --follow",
    help="Only the last N lines shown (after --level and --grep).",
)
@click.option("--level", metavar="L", help="Hide JSON lines below L (debug..critical).")
@click.option("--grep", metavar="TEXT", help="Only lines containing TEXT.")
@click.option(
    "--color/--no-color", default=None, show_default="on a terminal", help="Colour the output."
)
def logs(
    file: str | None,
    follow: bool,
    last: int | None,
    level: str | None,
    grep: str | None,
    color: bool | None,
) -> None:
    """Pretty-print JSON log lines from FILE or stdin; other lines pass through unchanged.

    Examples:

    \b
      journalctl -u streamd -o cat | streamd logs --level warning
      streamd logs /var/log/streamd.log -n 20 --grep ingest_progress
      streamd logs /var/log/streamd.log --follow
    """
    from streamd.observability.logview import LogView, min_level, show_logs

    def body() -> None:
        use_color = sys.stdout.isatty() if color is None else color
        view = LogView(min_level(level), grep, use_color)
        with contextlib.suppress(KeyboardInterrupt):  # how a --follow ends
            show_logs(file, view, follow=follow, last=last)

    run(body)
