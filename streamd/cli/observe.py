"""`streamd monitor` and `streamd logs`: the dashboard and the log viewer."""

from __future__ import annotations

import asyncio
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
@click.option("--once", is_flag=True, help="Print one frame and exit (1 if a source failed).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per refresh.")
@click.pass_context
def monitor(ctx: click.Context, interval_s: float, once: bool, as_json: bool) -> None:
    """The pipeline dashboard: stream, group lag, DLQ, Postgres totals, serve processes."""
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
    "start_lines",
    type=click.IntRange(0),
    default=10,
    show_default=True,
    help="With --follow: start with the last N lines.",
)
@click.option("--level", metavar="L", help="Hide JSON lines below L (debug..critical).")
@click.option("--grep", metavar="TEXT", help="Only lines containing TEXT.")
@click.option("--color/--no-color", default=None, help="Default: colour on a terminal.")
def logs(
    file: str | None,
    follow: bool,
    start_lines: int,
    level: str | None,
    grep: str | None,
    color: bool | None,
) -> None:
    """Pretty-print JSON log lines from FILE or stdin; other lines pass through unchanged.

    journalctl -u streamd -o cat | streamd logs --level warning
    """
    import os

    from streamd.observability.logview import LogView, min_level, show_logs

    def body() -> None:
        use_color = sys.stdout.isatty() if color is None else color
        view = LogView(min_level(level), grep, use_color)
        try:
            show_logs(file, view, follow=follow, start_lines=start_lines)
        except KeyboardInterrupt:
            pass  # how a --follow ends
        except BrokenPipeError:  # `streamd logs ... | head`: the reader left, which is fine
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    run(body)
