"""`streamd dev`: private Redis and Postgres servers for trying streamd out."""

from __future__ import annotations

import click

from streamd.cli.app import cli, run


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

    from streamd.dev.commands import dev_up, export_lines

    def body() -> None:
        env = dev_up(Path(root), redis_port=redis_port, postgres_port=postgres_port)
        click.echo("\n".join(export_lines(env)))
        hint = f'eval "$(streamd dev up)"  or  source {Path(root, "env")}'
        click.echo(f"# dev servers up; to use them in your shell: {hint}", err=True)

    run(body)


@dev.command("down")
@_dev_root
def dev_down_cmd(root: str) -> None:
    """Stop them (their data stays until `./run.sh clean`)."""
    from pathlib import Path

    from streamd.dev.commands import dev_down

    def body() -> None:
        for name, was_running in dev_down(Path(root)).items():
            click.echo(f"{name}: {'stopped' if was_running else 'was not running'}")

    run(body)


@dev.command("status")
@_dev_root
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def dev_status_cmd(root: str, as_json: bool) -> None:
    """Show whether they run, their pids and how to reach them."""
    import json
    from pathlib import Path

    from streamd.dev.commands import dev_status, format_status

    def body() -> None:
        status = dev_status(Path(root))
        click.echo(json.dumps(status) if as_json else format_status(status))

    run(body)
