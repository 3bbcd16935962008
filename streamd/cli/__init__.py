"""The `streamd` command line: parse, build Settings, call one function. No logic lives here."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from streamd.config.settings import Settings, load_settings
from streamd.errors import EXIT_USAGE, StreamdError
from streamd.observability.log import configure_logging

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """What the group's options hand to each command: settings are resolved lazily, once."""

    def __init__(self, config_file: str | None, overrides: dict[str, str]) -> None:
        self.config_file = config_file
        self.overrides = overrides

    def settings(self, **flags: Any) -> tuple[Settings, dict[str, str]]:
        return load_settings(config_file=self.config_file, flags=flags, set_values=self.overrides)


def _parse_set(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint="--set")
        out[key.strip().replace("-", "_")] = value
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    "config_file",
    metavar="FILE",
    envvar="STREAMD_CONFIG",
    help="Config file (TOML). Default: ./conf/streamd.toml, then "
    "/etc/streamd/streamd.toml, if present.",
)
@click.option(
    "--set",
    "overrides",
    metavar="KEY=VALUE",
    multiple=True,
    help="Override any config key, e.g. --set batch_size=1000 (repeatable).",
)
@click.version_option(package_name="streamd")
@click.pass_context
def cli(ctx: click.Context, config_file: str | None, overrides: tuple[str, ...]) -> None:
    """streamd: move events from Redis Streams into PostgreSQL, exactly once.

    Settings come from flags, then STREAMD_* environment variables, then the config file, then
    defaults. `streamd config` shows the result and where each value came from.
    """
    ctx.obj = Context(config_file, _parse_set(overrides))


def _run(func: Callable[[], Any]) -> Any:
    """Run a command body; user-facing errors become one line and their exit code."""
    try:
        return func()
    except StreamdError as exc:
        click.echo(f"streamd: error: {exc}", err=True)
        sys.exit(exc.exit_code)


def _configured(ctx: click.Context, **flags: Any) -> Settings:
    settings: Settings = ctx.obj.settings(**flags)[0]
    configure_logging(settings.log_level, settings.log_format)
    return settings


# --- serve ------------------------------------------------------------------------------------


def _procs(value: str | None) -> str | None:
    if value is None or value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter("must be 'auto' or a number >= 1", param_hint="--procs")
    return value


@cli.command()
@click.option(
    "--procs",
    metavar="auto|N",
    callback=lambda _c, _p, v: _procs(v),
    help="Worker processes (default: auto, one per CPU core). Env STREAMD_PROCS.",
)
@click.option(
    "--tasks",
    type=click.IntRange(1, 256),
    metavar="N",
    help="Consumer tasks per process (default 5). Env STREAMD_TASKS.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    metavar="N",
    help="Events per batch (default 2000). Env STREAMD_BATCH_SIZE.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    help="Port for /metrics, /healthz, /readyz on metrics_host; 0 disables.",
)
@click.pass_context
def serve(
    ctx: click.Context,
    procs: str | None,
    tasks: int | None,
    batch_size: int | None,
    metrics_port: int | None,
) -> None:
    """Run the pipeline until SIGTERM/SIGINT (then flush, acknowledge and exit 0).

    Creates the schema and the consumer group if missing. SIGHUP reloads the config.
    """
    flags = {"procs": procs, "tasks": tasks, "batch_size": batch_size, "metrics_port": metrics_port}

    def reload() -> Settings:
        """Settings read afresh (SIGHUP), with the same file, flags and --set values."""
        settings: Settings = ctx.obj.settings(**flags)[0]
        return settings

    def body() -> None:
        settings = _configured(ctx, **flags)
        # Imported once the settings are known good: a config error answers without the wait.
        from streamd.supervisor.serve import serve as run_serve

        sys.exit(run_serve(settings, reload=reload))

    _run(body)


# --- db ---------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("init")
@click.pass_context
def db_init(ctx: click.Context) -> None:
    """Create or upgrade the events and dead-letter tables (idempotent)."""
    from streamd.backends.preflight import check_postgres

    def body() -> None:
        settings = _configured(ctx)
        asyncio.run(check_postgres(settings))
        click.echo(f"schema ready: tables {settings.events_table}, {settings.dlq_table}")

    _run(body)


# --- config -----------------------------------------------------------------------------------


@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--sources/--no-sources", default=True, help="Show where each value came from.")
@click.option(
    "--defaults",
    is_flag=True,
    help="Print every key at its default, documented: a starting conf/streamd.toml.",
)
@click.pass_context
def config_cmd(ctx: click.Context, as_json: bool, sources: bool, defaults: bool) -> None:
    """Print the effective config (passwords masked)."""
    from streamd.config.view import render_config, render_defaults

    def body() -> None:
        if defaults:
            click.echo(render_defaults())
            return
        settings, where = ctx.obj.settings()
        click.echo(render_config(settings, where, as_json=as_json, with_sources=sources))

    _run(body)


# --- dev --------------------------------------------------------------------------------------


@cli.group()
def dev() -> None:
    """Private local Redis and PostgreSQL for trying streamd out (data in .streamd/dev)."""


_dev_root = click.option(
    "--root",
    default=".streamd/dev",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the dev servers keep data, logs and pid files.",
)


@dev.command("up")
@_dev_root
@click.option("--redis-port", type=click.IntRange(1, 65535), help="Default 16379.")
@click.option("--postgres-port", type=click.IntRange(1, 65535), help="Default 15432.")
def dev_up_cmd(root: str, redis_port: int | None, postgres_port: int | None) -> None:
    """Start them (if not running) and print the environment that points streamd at them.

    Use it as: eval "$(streamd dev up)", or run it and then: source .streamd/dev/env
    """
    from pathlib import Path

    from streamd.dev.servers import dev_up, export_lines

    def body() -> None:
        env = dev_up(Path(root), redis_port=redis_port, postgres_port=postgres_port)
        click.echo("\n".join(export_lines(env)))
        hint = f'eval "$(streamd dev up)"  or  source {Path(root, "env")}'
        click.echo(f"# dev servers up; to use them in your shell: {hint}", err=True)

    _run(body)


@dev.command("down")
@_dev_root
def dev_down_cmd(root: str) -> None:
    """Stop them (their data stays until `./run.sh clean`)."""
    from pathlib import Path

    from streamd.dev.servers import dev_down

    def body() -> None:
        for name, was_running in dev_down(Path(root)).items():
            click.echo(f"{name}: {'stopped' if was_running else 'was not running'}")

    _run(body)


@dev.command("status")
@_dev_root
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def dev_status_cmd(root: str, as_json: bool) -> None:
    """Show whether they run, their pids and how to reach them."""
    import json
    from pathlib import Path

    from streamd.dev.servers import dev_status, format_status

    def body() -> None:
        status = dev_status(Path(root))
        click.echo(json.dumps(status) if as_json else format_status(status))

    _run(body)


# --- produce ----------------------------------------------------------------------------------


def _round_trip_batch(default: int) -> Callable[[F], F]:
    """--batch: how many events a producing command sends per round trip."""
    return click.option(
        "--batch",
        "batch_size",
        type=click.IntRange(1, 100_000),
        default=default,
        show_default=True,
        metavar="N",
        help="Events per round trip, at most.",
    )


@cli.command()
@click.argument("count", type=click.IntRange(1), metavar="N")
@click.option(
    "--rate",
    type=click.FloatRange(0, min_open=True),
    metavar="R",
    help="Events per second (default: as fast as possible).",
)
@_round_trip_batch(default=500)
@click.option(
    "--type",
    "event_type",
    metavar="T",
    help="Only this sample type (default: all five, mixed): user_created, order_placed, "
    "payment_processed, product_viewed, order_shipped.",
)
@click.pass_context
def produce(
    ctx: click.Context, count: int, rate: float | None, batch_size: int, event_type: str | None
) -> None:
    """Produce N sample events to the stream (waits while the backlog is above max_backlog)."""
    import uvloop

    from streamd.tools.samples import produce_samples

    def body() -> None:
        settings = _configured(ctx)
        uvloop.run(
            produce_samples(
                settings, count, rate=rate, batch_size=batch_size, event_type=event_type
            )
        )

    _run(body)


# --- monitor ----------------------------------------------------------------------------------


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
        settings = _configured(ctx)
        try:
            code = asyncio.run(
                run_monitor(settings, interval_s=interval_s, once=once, as_json=as_json)
            )
        except KeyboardInterrupt:
            code = 0  # Ctrl-C is how a dashboard is closed
        sys.exit(code)

    _run(body)


# --- logs -------------------------------------------------------------------------------------


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

    _run(body)


# --- dlq --------------------------------------------------------------------------------------


@cli.group()
def dlq() -> None:
    """Inspect and re-drive dead letters (table dead_letter_queue, stream <stream>:dead)."""


@dlq.command("list")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True, metavar="N")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_context
def dlq_list_cmd(ctx: click.Context, limit: int, as_json: bool) -> None:
    """The newest dead letters of the stream, and how many there are."""
    from streamd.tools.dlq_admin import dlq_list

    _run(lambda: asyncio.run(dlq_list(_configured(ctx), limit, as_json)))


@dlq.command("replay")
@click.option("--id", "ids", multiple=True, metavar="ID", help="Table id or entry ID (repeatable).")
@click.option("--all", "replay_all", is_flag=True, help="Every dead letter of the stream.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def dlq_replay_cmd(ctx: click.Context, ids: tuple[str, ...], replay_all: bool, yes: bool) -> None:
    """Re-queue dead letters to their stream (original fields), then remove them from the DLQ."""
    from streamd.tools.dlq_admin import dlq_replay

    _run(lambda: asyncio.run(dlq_replay(_configured(ctx), ids, replay_all, yes)))


@dlq.command("purge")
@click.option("--before", metavar="T", help="Only those that failed before T: ISO time or 7d/12h.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def dlq_purge_cmd(ctx: click.Context, before: str | None, yes: bool) -> None:
    """Delete dead letters for good (table and dead stream)."""
    from streamd.tools.dlq_admin import dlq_purge

    _run(lambda: asyncio.run(dlq_purge(_configured(ctx), before, yes)))


# --- bench ------------------------------------------------------------------------------------


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
@click.option("--serve", "own_serve", is_flag=True, help="Start (and stop) a serve of its own.")
@click.option(
    "--procs", type=click.IntRange(1, 256), default=1, show_default=True, help="With --serve."
)
@_round_trip_batch(default=1000)
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
    procs: int,
    batch_size: int,
    wait_s: float,
    as_json: bool,
) -> None:
    """End-to-end benchmark: rate accuracy, latency percentiles, exactly-once check.

    Either --rate R --duration D, or --drain N. Against a running serve, or --serve.
    Exits 1 if any event was lost or duplicated.
    """
    import uvloop

    from streamd.tools.bench import BenchPlan, run_bench

    if drain is None and (rate is None or duration_s is None):
        raise click.UsageError("give --rate R and --duration D, or --drain N")
    if drain is not None and (rate is not None or duration_s is not None):
        raise click.UsageError("--drain N cannot be combined with --rate/--duration")
    obj: Context = ctx.obj
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
        settings = _configured(ctx)
        sys.exit(uvloop.run(run_bench(settings, plan, as_json=as_json)))

    _run(body)


# --- --config and --set after the command too ---------------------------------------------


def _context(ctx: click.Context) -> Context:
    obj = ctx.find_object(Context)
    assert obj is not None, "the group's callback runs before its commands parse their options"
    return obj


def _set_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        _context(ctx).config_file = value


def _add_overrides(ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> None:
    _context(ctx).overrides.update(_parse_set(values))


def _settings_commands(group: click.Group) -> list[click.Command]:
    """Every command that reads the settings (not `logs`, not `dev`)."""
    out: list[click.Command] = []
    for command in group.commands.values():
        if isinstance(command, click.Group):
            out += [] if command is dev else _settings_commands(command)
        elif command is not logs:
            out.append(command)
    return out


# `streamd serve --config FILE` (as systemd units and habits write it) means what
# `streamd --config FILE serve` means; given in both places, the command's own wins.
for _command in _settings_commands(cli):
    _command.params += [
        click.Option(
            ["--config", "config_file"],
            metavar="FILE",
            expose_value=False,
            callback=_set_config_file,
            help="Config file (TOML), as `streamd --config FILE`.",
        ),
        click.Option(
            ["--set", "overrides"],
            metavar="KEY=VALUE",
            multiple=True,
            expose_value=False,
            callback=_add_overrides,
            help="Override a config key (repeatable), as `streamd --set`.",
        ),
    ]


def main() -> None:
    try:
        cli(standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


__all__ = ["EXIT_USAGE", "cli", "main"]
