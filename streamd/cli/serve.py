"""`streamd serve`, `streamd db` and `streamd config`: the pipeline, its schema, its settings."""

from __future__ import annotations

import asyncio
import sys

import click

from streamd.cli.app import cli, configured, from_config, run
from streamd.config.settings import Settings


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
    show_default=from_config("procs"),
    help="Worker processes: auto is one per CPU core. Env STREAMD_PROCS.",
)
@click.option(
    "--tasks",
    type=click.IntRange(1, 256),
    metavar="N",
    show_default=from_config("tasks"),
    help="Consumer tasks per process. Env STREAMD_TASKS.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    metavar="N",
    show_default=from_config("batch_size"),
    help="Events per batch. Env STREAMD_BATCH_SIZE.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    show_default=from_config("metrics_port"),
    help="Port for /metrics, /healthz, /readyz on metrics_host; 0 disables. Env "
    "STREAMD_METRICS_PORT.",
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

    Examples:

    \b
      streamd serve
      streamd serve --procs 2 --tasks 8 --metrics-port 0
      streamd serve --config /etc/streamd/streamd.toml
    """
    flags = {"procs": procs, "tasks": tasks, "batch_size": batch_size, "metrics_port": metrics_port}

    def reload() -> Settings:
        """Settings read afresh (SIGHUP), with the same file, flags and --set values."""
        settings: Settings = ctx.obj.settings(**flags)[0]
        return settings

    def body() -> None:
        settings = configured(ctx, **flags)
        # Imported once the settings are known good: a config error answers without the wait.
        from streamd.supervisor.serve import serve as run_serve

        sys.exit(run_serve(settings, reload=reload))

    run(body)


@cli.command()
@click.option("--ready", is_flag=True, help="Ask /readyz (consuming, Redis and Postgres up).")
@click.pass_context
def health(ctx: click.Context, ready: bool) -> None:
    """Ask a running serve's /healthz (exit 0 when it answers 200, else 1).

    It asks metrics_host:metrics_port from the same settings as serve; the image's HEALTHCHECK
    runs it.

    Examples:

    \b
      streamd health
      streamd --set metrics_port=19465 health --ready
    """
    from streamd.observability.probe import probe

    def body() -> None:
        ok, line = probe(configured(ctx), ready)
        click.echo(line, err=not ok)
        sys.exit(0 if ok else 1)

    run(body)


@cli.group()
def db() -> None:
    """Database schema.

    Examples:

    \b
      streamd db init
    """


@db.command("init")
@click.pass_context
def db_init(ctx: click.Context) -> None:
    """Create or upgrade the events and dead-letter tables, and typed tables (idempotent).

    Examples:

    \b
      streamd db init
      STREAMD_POSTGRES_DSN=postgresql://owner@db/app streamd db init
    """
    from streamd.backends.preflight import check_postgres

    def body() -> None:
        settings = configured(ctx)
        asyncio.run(check_postgres(settings))
        typed = [t.name for t in settings.tables if t.typed]
        tables = ", ".join((*settings.table_names, *typed, settings.dlq_table))
        click.echo(f"schema ready: tables {tables}")

    run(body)


@db.command("partitions")
@click.option(
    "--upkeep",
    is_flag=True,
    help="First run one round of partition upkeep (create ahead, apply retention), as serve "
    "does every maintenance_interval_s: for a cron job of the table owner.",
)
@click.pass_context
def db_partitions(ctx: click.Context, upkeep: bool) -> None:
    """List each events table's partitions: time ranges (UTC), sizes, row estimates.

    Examples:

    \b
      streamd db partitions
      streamd --set retention="30 days" db partitions --upkeep
    """
    from streamd.tools.partitions_admin import partition_report

    def body() -> None:
        click.echo(asyncio.run(partition_report(configured(ctx), run_upkeep=upkeep)))

    run(body)


@db.command("migrate")
@click.pass_context
def db_migrate(ctx: click.Context) -> None:
    """Convert the events table to the current layout (the two-bigint key, partitioned by
    partition_interval), online: serve may keep running. Resumable: run it again after an
    interruption. The old table is kept as <table>_premigrate. See docs/partitions.md.

    Examples:

    \b
      streamd db migrate
      streamd --set partition_interval=hour db migrate
    """
    from streamd.tools.partitions_admin import run_migrate

    def body() -> None:
        asyncio.run(run_migrate(configured(ctx), lambda line: click.echo(line, err=True)))

    run(body)


@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--sources/--no-sources", default=True, help="Show where each value came from.")
@click.option(
    "--defaults",
    is_flag=True,
    help="Print every key at its built-in value, documented: a starting conf/streamd.toml.",
)
@click.option(
    "--redis-acl",
    is_flag=True,
    help="Print the minimal Redis ACL (ACL SETUSER) of serve, produce, monitor and dlq for the "
    "configured stream, group and dead-letter names.",
)
@click.pass_context
def config_cmd(
    ctx: click.Context, as_json: bool, sources: bool, defaults: bool, redis_acl: bool
) -> None:
    """Print the effective config (passwords masked).

    Examples:

    \b
      streamd config
      streamd config --json --no-sources
      streamd config --defaults > conf/streamd.toml
      streamd config --redis-acl
    """
    from streamd.config.view import render_config, render_defaults

    def body() -> None:
        if defaults:
            click.echo(render_defaults())
            return
        if redis_acl:
            from streamd.cli.acl_rules import acl_rules

            for family, rule in acl_rules(ctx.obj.settings()[0]).items():
                click.echo(f"# {family}\n{rule}")
            return
        settings, where = ctx.obj.settings()
        click.echo(render_config(settings, where, as_json=as_json, with_sources=sources))

    run(body)
