"""The CLI reference of docs/cli.md, rendered from the click group itself.

Every command and subcommand gets its usage line, its help text and its options with their
defaults, so the page says what `streamd ... --help` says. A test keeps the page equal to
`render_cli_reference()`.
"""

from __future__ import annotations

import re

import click

_MARKDOWN_SPECIAL = re.compile(r"([\\*\[\]])")


def _text(value: str) -> str:
    """Help text as Markdown prose: what Markdown would read as markup or HTML is escaped."""
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", value)
    return escaped.replace("<", "&lt;").replace(">", "&gt;")


def _paragraphs(help_text: str) -> list[str]:
    """Click's own rule: blank lines split paragraphs, and lines within one are rewrapped."""
    paragraphs = re.split(r"\n\s*\n", help_text.strip())
    return [" ".join(line.strip() for line in p.splitlines()) for p in paragraphs if p.strip()]


def _blocks(help_text: str) -> list[str]:
    """A command's help as Markdown blocks: prose paragraphs, and the paragraphs click keeps as
    they are (marked with \\b: the examples) as code blocks."""
    out = []
    for paragraph in re.split(r"\n\s*\n", help_text.strip()):
        if paragraph.lstrip().startswith("\b"):
            lines = [line.strip() for line in paragraph.splitlines()[1:] if line.strip()]
            out.append("```sh\n" + "\n".join(lines) + "\n```")
        elif paragraph.strip():
            out.append(_text(" ".join(line.strip() for line in paragraph.splitlines())))
    return out


def _option(option: click.Option, ctx: click.Context) -> str:
    record = option.get_help_record(ctx)
    names = record[0] if record else " / ".join(option.opts)
    line = f"- `{names}`"
    if option.help:
        line += f": {_text(' '.join(_paragraphs(option.help)))}"
    extra = option.get_help_extra(ctx)  # what --help shows in brackets, defaults always on
    notes = []
    if "default" in extra:
        notes.append(f"default `{extra['default']}`")
    if "range" in extra:
        notes.append(f"range `{extra['range']}`")
    if isinstance(option.envvar, str):
        notes.append(f"env `{option.envvar}`")
    if notes:
        line += f" ({', '.join(notes)})"
    return line


def _command(command: click.Command, ctx: click.Context, level: int) -> list[str]:
    """One command's section, then its subcommands' (one heading level deeper)."""
    usage = " ".join([ctx.command_path, *command.collect_usage_pieces(ctx)])
    out = [f"{'#' * level} `{ctx.command_path}`", "", "```", usage, "```", ""]
    for block in _blocks(command.help or ""):
        out += [block, ""]
    help_option = command.get_help_option(ctx)
    options = [
        p
        for p in command.get_params(ctx)
        if isinstance(p, click.Option) and not p.hidden and p is not help_option
    ]
    if options:
        out += ["Options:", ""]
        out += [_option(option, ctx) for option in options]
        out.append("")
    if isinstance(command, click.Group):
        names = command.list_commands(ctx)
        out += ["Commands:", ""]
        for name in names:
            sub = command.get_command(ctx, name)
            assert sub is not None
            out.append(f"- `{name}`: {_text(sub.get_short_help_str(limit=200))}")
        out.append("")
        for name in names:
            sub = command.get_command(ctx, name)
            assert sub is not None
            sub_ctx = click.Context(sub, info_name=name, parent=ctx, **sub.context_settings)
            # `streamd` and its commands share a level; `streamd db init` goes one deeper.
            out += _command(sub, sub_ctx, level + 1 if ctx.parent else level)
    return out


def render_cli_reference() -> str:
    """Markdown for every command of `streamd`, in the order `streamd --help` lists them."""
    from streamd.cli import cli  # imported here: the reference follows the CLI wherever it lives

    settings = {**cli.context_settings, "show_default": True}  # as `streamd --help` sees them
    ctx = click.Context(cli, info_name="streamd", **settings)
    lines = [
        "Every command also takes `-h`, `--help`.",
        "",
        *_command(cli, ctx, level=2),
    ]
    return "\n".join(lines).rstrip() + "\n"
