"""SQL text helpers: table names from the config go into statements through these."""

from __future__ import annotations


def quote_ident(name: str) -> str:
    """name as a Postgres identifier: in double quotes, a quote inside it doubled."""
    return '"' + name.replace('"', '""') + '"'
