"""Every command's --help: defaults shown one way (click's "[default: ...]"), and examples that
are real invocations of that command (each one is parsed by the command line itself)."""

from __future__ import annotations

import re
import shlex
import warnings
from collections.abc import Iterator

import click
import pytest

from streamd.cli import cli
from streamd.cli.app import Context


def commands(
    group: click.Group = cli, path: tuple[str, ...] = ("streamd",)
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, group
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


ALL = list(commands())
IDS = [" ".join(path) for path, _ in ALL]


def examples(command: click.Command) -> list[str]:
    """The lines of the kept-as-is (\\b) paragraph after "Examples:"."""
    help_text = command.help or ""
    _, found, after = help_text.partition("Examples:")
    assert found, "no Examples: paragraph"
    block = re.split(r"\n\s*\n", after.strip())[0]
    assert block.lstrip().startswith("\b"), "the examples must be a \\b block (kept as they are)"
    return [line.strip() for line in block.splitlines()[1:] if line.strip()]


def streamd_argv(example: str) -> list[str]:
    """The streamd invocation in an example line: inside $(...), after a pipe, after leading
    VAR=value assignments, before a redirection."""
    inner = re.search(r"\$\((streamd[^)]*)\)", example)
    text = inner.group(1) if inner else example.split("|")[-1]
    words = shlex.split(text.split(">")[0])
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        words.pop(0)
    assert words and words[0] == "streamd", example
    return words[1:]


def remaining(ctx: click.Context) -> list[str]:
    """The words a group left for its subcommand (click 8 splits them in two lists)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # protected_args, going in click 9
        return [*getattr(ctx, "protected_args", []), *ctx.args]


def parse(argv: list[str]) -> list[str]:
    """Parse argv as `streamd` would, without running anything; the command path it reaches."""
    ctx = cli.make_context("streamd", list(argv), resilient_parsing=False)
    ctx.obj = Context(None, {})
    path = ["streamd"]
    command: click.Command = cli
    args = remaining(ctx)
    while isinstance(command, click.Group) and args:
        name, sub, rest = command.resolve_command(ctx, args)
        assert sub is not None and name is not None
        ctx = sub.make_context(name, rest, parent=ctx)
        path.append(name)
        command = sub
        args = remaining(ctx) if isinstance(sub, click.Group) else []
    return path


@pytest.mark.parametrize(("path", "command"), ALL, ids=IDS)
def test_every_command_gives_examples_that_parse(
    path: tuple[str, ...], command: click.Command
) -> None:
    lines = examples(command)
    assert lines
    reached = []
    for example in lines:
        if example.endswith("COMMAND --help"):
            continue  # a placeholder in the group's own help
        reached.append(tuple(parse(streamd_argv(example))))
    if not isinstance(command, click.Group):
        assert all(r == path for r in reached), reached  # the examples use this very command
    else:
        assert all(r[: len(path)] == path for r in reached), reached


@pytest.mark.parametrize(("path", "command"), ALL, ids=IDS)
def test_defaults_are_shown_one_way(path: tuple[str, ...], command: click.Command) -> None:
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        assert "default" not in (param.help or "").lower(), (
            f"{' '.join(path)} {param.opts[0]}: say the default with show_default, not in the help"
        )
        has_default = param.default is not None and not (param.is_flag and not param.default)
        if has_default and not param.multiple:
            assert param.show_default is not False, f"{param.opts[0]} hides its default"


def test_help_shows_defaults_in_brackets() -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "[default: (procs from the config, else auto)]" in text
    result = CliRunner().invoke(cli, ["monitor", "--help"])
    assert "[default: 5.0; x>=0.1]" in " ".join(result.output.split())  # plain ones too
