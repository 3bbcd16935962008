"""`streamd dlq list|replay|purge`: inspect and re-drive dead letters."""

from __future__ import annotations

import asyncio

import click

from streamd.cli.app import cli, configured, run


@cli.group()
def dlq() -> None:
    """Inspect and re-drive dead letters (table dead_letter_queue, stream <stream>:dead).

    Examples:

    \b
      streamd dlq list
      streamd dlq replay --all
    """


@dlq.command("list")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True, metavar="N")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_context
def dlq_list_cmd(ctx: click.Context, limit: int, as_json: bool) -> None:
    """The newest dead letters of the stream, and how many there are.

    Examples:

    \b
      streamd dlq list
      streamd dlq list --limit 100 --json
    """
    from streamd.tools.dlq_admin import dlq_list

    run(lambda: asyncio.run(dlq_list(configured(ctx), limit, as_json)))


@dlq.command("replay")
@click.option("--id", "ids", multiple=True, metavar="ID", help="Table id or entry ID (repeatable).")
@click.option("--all", "replay_all", is_flag=True, help="Every dead letter of the stream.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def dlq_replay_cmd(ctx: click.Context, ids: tuple[str, ...], replay_all: bool, yes: bool) -> None:
    """Re-queue dead letters to their stream (original fields), then remove them from the DLQ.

    Examples:

    \b
      streamd dlq replay --id 1795634353417-0
      streamd dlq replay --all --yes
    """
    from streamd.tools.dlq_admin import dlq_replay

    run(lambda: asyncio.run(dlq_replay(configured(ctx), ids, replay_all, yes)))


@dlq.command("purge")
@click.option("--before", metavar="T", help="Only those that failed before T: ISO time or 7d/12h.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def dlq_purge_cmd(ctx: click.Context, before: str | None, yes: bool) -> None:
    """Delete dead letters for good (table and dead stream).

    Examples:

    \b
      streamd dlq purge --before 7d
      streamd dlq purge --yes
    """
    from streamd.tools.dlq_admin import dlq_purge

    run(lambda: asyncio.run(dlq_purge(configured(ctx), before, yes)))
