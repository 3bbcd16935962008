"""The click group, its shared options, and how a command reports a user error (one line)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from streamd.config.settings import Settings
from streamd.config.sources import load_settings
from streamd.errors import StreamdError
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


# Every option's default is shown the one way, click's "[default: ...]" (a default that depends
# on something else is a phrase in parentheses), and every command's help ends with examples.
CONTEXT_SETTINGS = {
    "help_option_names": ["-h", "--help"],
    "max_content_width": 100,
    "show_default": True,
}


def from_config(key: str) -> str:
    """show_default for a flag that overrides a config key: the key, and its own default."""
    default = Settings.__dataclass_fields__[key].default
    return f"{key} from the config, else {default}"


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option(
    "--config",
    "config_file",
    metavar="FILE",
    envvar="STREAMD_CONFIG",
    show_default="./conf/streamd.toml, then /etc/streamd/streamd.toml, if present",
    help="Config file (TOML).",
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

    Examples:

    \b
      streamd serve
      streamd --config /etc/streamd/streamd.toml --set batch_size=500 serve
      streamd COMMAND --help
    """
    ctx.obj = Context(config_file, _parse_set(overrides))


def run(func: Callable[[], Any]) -> Any:
    """Run a command body; user-facing errors become one line and their exit code. A reader
    that leaves early (`streamd logs ... | head`) ends the command quietly, with 0."""
    try:
        return func()
    except StreamdError as exc:
        click.echo(f"streamd: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        # Later writes (and the flush at exit) would fail again, with a traceback: send what is
        # left of stdout nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


def configured(ctx: click.Context, **flags: Any) -> Settings:
    settings: Settings = ctx.obj.settings(**flags)[0]
    configure_logging(settings.log_level, settings.log_format)
    return settings


def round_trip_batch(default: int) -> Callable[[F], F]:
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


def _context(ctx: click.Context) -> Context:
    obj = ctx.find_object(Context)
    assert obj is not None, "the group's callback runs before its commands parse their options"
    return obj


def _set_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        _context(ctx).config_file = value


def _add_overrides(ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> None:
    _context(ctx).overrides.update(_parse_set(values))


def _settings_commands(group: click.Group, skip: set[click.Command]) -> list[click.Command]:
    """Every command that reads the settings: all but those in `skip` and their subcommands."""
    out: list[click.Command] = []
    for command in group.commands.values():
        if isinstance(command, click.Group):
            out += [] if command in skip else _settings_commands(command, skip)
        elif command not in skip:
            out.append(command)
    return out


# `streamd serve --config FILE` (as systemd units and habits write it) means what
# `streamd --config FILE serve` means; given in both places, the command's own wins.
def add_settings_options(group: click.Group, skip: set[click.Command]) -> None:
    for command in _settings_commands(group, skip):
        command.params += [
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
