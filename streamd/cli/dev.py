"""`streamd dev`: private Redis and Postgres servers for trying streamd out."""

from __future__ import annotations

from collections.abc import Callable

import click

from streamd.cli.app import F, cli, run
from streamd.dev.common import DEV_POSTGRES_PORT, DEV_REDIS_PORT


@cli.group()
def dev() -> None:
    """Private local Redis and PostgreSQL for trying streamd out (data in .streamd/dev).

    Examples:

    \b
      eval "$(streamd dev up)"
      streamd dev status
      streamd dev down
    """


DEFAULT_ROOT = ".streamd/dev"
_dev_root = click.option(
    "--root",
    default=DEFAULT_ROOT,
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the dev servers keep data, logs and pid files.",
)


def _port_option(server: str, default: int) -> Callable[[F], F]:
    """--redis-port / --postgres-port: remembered in the dev root for the next `up`."""
    return click.option(
        f"--{server}-port",
        type=click.IntRange(1, 65535),
        metavar="N",
        show_default=f"{default}, or the port of the last up",
        help=f"Port for the dev {'Redis' if server == 'redis' else 'PostgreSQL'} (remembered).",
    )


@dev.command("up")
@_dev_root
@_port_option("redis", DEV_REDIS_PORT)
@_port_option("postgres", DEV_POSTGRES_PORT)
def dev_up_cmd(root: str, redis_port: int | None, postgres_port: int | None) -> None:
    """Start them (if not running) and print the environment that points streamd at them.

    Both ports are checked before either server starts. Use it as: eval "$(streamd dev up)",
    or run it and then: source .streamd/dev/env (with run.sh: eval "$(./run.sh env)").

    Examples:

    \b
      eval "$(streamd dev up)"
      streamd dev up --redis-port 26379 --postgres-port 25432
    """
    import shlex
    from pathlib import Path

    from streamd.dev.commands import command_hint, dev_up, export_lines

    def body() -> None:
        env = dev_up(Path(root), redis_port=redis_port, postgres_port=postgres_port)
        click.echo("\n".join(export_lines(env)))
        env_file = Path(root, "env")
        if command_hint() == "./run.sh":
            hint = f'eval "$(./run.sh env)"  or  source {env_file}'
        else:
            where = "" if root == DEFAULT_ROOT else f" --root {shlex.quote(root)}"
            hint = f'eval "$({command_hint()} dev up{where})"  or  source {env_file}'
        click.echo(f"# dev servers up; to use them in your shell: {hint}", err=True)

    run(body)


@dev.command("down")
@_dev_root
def dev_down_cmd(root: str) -> None:
    """Stop them (their data stays until `./run.sh clean`).

    Examples:

    \b
      streamd dev down
    """
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
    """Show whether they run, their pids and how to reach them.

    Examples:

    \b
      streamd dev status
      streamd dev status --json
    """
    import json
    from pathlib import Path

    from streamd.dev.commands import dev_status, format_status

    def body() -> None:
        status = dev_status(Path(root))
        click.echo(json.dumps(status) if as_json else format_status(status))

    run(body)
