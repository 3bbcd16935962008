"""Rendering settings for people: `streamd config` and the documented conf/streamd.toml."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from streamd.config.settings import SECRET_KEYS, Settings


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:_}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        return repr(value)
    # A JSON string is a valid TOML basic string; a tuple of strings, a valid TOML array.
    return orjson.dumps(value).decode()


def render_config(
    settings: Settings,
    sources: dict[str, str],
    *,
    as_json: bool = False,
    with_sources: bool = True,
) -> str:
    """The effective settings, secrets masked, with the source of each value."""
    masked = settings.masked()
    if as_json:
        body: dict[str, Any] = {"settings": masked}
        if with_sources:
            body["sources"] = sources
        return orjson.dumps(body, option=orjson.OPT_INDENT_2).decode()
    width = max(len(k) for k in masked)
    lines = []
    for key, value in masked.items():
        line = f"{key:<{width}} = {_toml_value(value)}"
        if with_sources:
            line = f"{line:<72}  # {sources.get(key, 'default')}"
        lines.append(line)
    return "\n".join(lines)


def render_defaults() -> str:
    """conf/streamd.toml: every key at its default, with its meaning as a comment."""
    out = [
        "# streamd configuration. Every key is listed, commented out, at its default value:",
        "# uncomment a line to change it. Units are in the names (_ms, _s, _bytes).",
        "# Precedence: command-line flag > environment (STREAMD_<KEY>) > this file > default.",
        "# Secrets: prefer STREAMD_REDIS_PASSWORD_FILE / STREAMD_POSTGRES_PASSWORD_FILE (or the",
        "# redis_password_file / postgres_password_file keys) over passwords written here.",
        "",
    ]
    for f in dataclasses.fields(Settings):
        out.append(f"## {f.metadata['doc']}")
        out.append(f"## env: STREAMD_{f.name.upper()}")
        value = "" if f.name in SECRET_KEYS else f.default
        out.append(f"# {f.name} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def render_reference() -> str:
    """docs/configuration.md's config reference: a Markdown table of every key."""
    lines = ["| key (env `STREAMD_<KEY>`) | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(Settings):
        default = _toml_value(f.default)
        doc = f.metadata["doc"].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        lines.append(f"| `{f.name}` | `{default}` | {doc} |")
    return "\n".join(lines)
