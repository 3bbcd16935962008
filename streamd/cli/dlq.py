"""`streamd dlq list|replay|purge`: inspect and re-drive dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import click

from streamd.cli.app import cli, configured, run

F = TypeVar("F", bound=Callable[..., Any])


def stream_option(f: F) -> F:
    """--stream NAME, repeatable; by default every stream the config names."""
    option = click.option(
        "--stream",
        "streams",
        multiple=True,
        metavar="NAME",
        show_default="every configured stream",
        help="Only this stream's dead letters (a name or a pattern; repeatable).",
    )
    return option(f)


@cli.group()
def dlq() -> None:
    """Inspect and re-drive dead letters (table dead_letter_queue, stream <stream>:dead).

    Each command covers every configured stream (patterns resolved), or those given with
    --stream; a replay re-queues each entry to its own stream.

    Examples:

    \b
      streamd dlq list
      streamd dlq list --stream orders
      streamd dlq replay --all --stream 'tenant:*'
    """


@dlq.command("list")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True, metavar="N")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@stream_option
@click.pass_context
def dlq_list_cmd(ctx: click.Context, limit: int, as_json: bool, streams: tuple[str, ...]) -> None:
    """The newest dead letters of the streams, and how many each has.

    Examples:

    \b
      streamd dlq list
      streamd dlq list --stream orders --limit 100 --json
    """
    from streamd.tools.dlq_admin import dlq_list

    run(lambda: asyncio.run(dlq_list(configured(ctx), limit, as_json, streams=streams)))


@dlq.command("replay")
@click.option("--id", "ids", multiple=True, metavar="ID", help="Table id or entry ID (repeatable).")
@click.option("--all", "replay_all", is_flag=True, help="Every dead letter of the streams.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@stream_option
@click.pass_context
def dlq_replay_cmd(
    ctx: click.Context, ids: tuple[str, ...], replay_all: bool, yes: bool, streams: tuple[str, ...]
) -> None:
    """Re-queue dead letters to their own stream (original fields), then remove them from the DLQ.

    Examples:

    \b
      streamd dlq replay --id 1795634353417-0
      streamd dlq replay --all --stream orders --yes
    """
    from streamd.tools.dlq_admin import dlq_replay

    run(lambda: asyncio.run(dlq_replay(configured(ctx), ids, replay_all, yes, streams=streams)))


@dlq.command("purge")
@click.option("--before", metavar="T", help="Only those that failed before T: ISO time or 7d/12h.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@stream_option
@click.pass_context
def dlq_purge_cmd(
    ctx: click.Context, before: str | None, yes: bool, streams: tuple[str, ...]
) -> None:
    """Delete dead letters for good (table and dead streams).

    Examples:

    \b
      streamd dlq purge --before 7d
      streamd dlq purge --stream orders --yes
    """
    from streamd.tools.dlq_admin import dlq_purge

    run(lambda: asyncio.run(dlq_purge(configured(ctx), before, yes, streams=streams)))
