"""Routing streams to tables: `[tables.<name>]` sections, and the env form of simple ones.

A section names a table and the streams (names or glob patterns) whose entries go there:

    [tables.orders_events]
    streams = ["orders"]

Typed tables declare columns too (`columns`, `mode`, `key`, `types`, `delete_types`,
`keep_payload`); those keys are parsed and checked here, so every table a config names is valid
before anything connects. A stream that no section matches goes to `events_table`; one that
several match goes to the section that names it exactly, else to the first pattern in file order.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from streamd.errors import ConfigError

TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,47}")
COLUMN_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# A stream name (letters, digits and _ : { } . -) or a glob pattern over them (* ? [ ] ^ !).
STREAM_PATTERN = re.compile(r"[A-Za-z0-9_:{}.\-*?\[\]^!]{1,200}")
# Postgres types a column may be declared with: plain names, a length or precision, an array.
PG_TYPE = re.compile(r"[a-z][a-z0-9_]*( [a-z][a-z0-9_]*)*(\(\d+(, ?\d+)?\))?(\[\])?")
JSON_PATH = re.compile(r"\$(\.[A-Za-z_][A-Za-z0-9_]*)+")
# The envelope columns every table has (and an upsert table's position, entry_ms and entry_seq):
# a declared column may not take one of these names.
ENVELOPE_COLUMNS = frozenset(
    {"id", "stream", "entry_id", "event_type", "payload", "produced_at", "ingested_at", "meta"}
    | {"entry_ms", "entry_seq", "streamd_delete"}
)
SECTION_KEYS = ("streams", "columns", "mode", "key", "types", "delete_types", "keep_payload")

Mode = Literal["append", "upsert"]


@dataclass(frozen=True, slots=True)
class ColumnSpec:
    """A typed column: its name, its Postgres type, and the payload path its value comes from."""

    name: str
    pg_type: str
    path: tuple[str, ...]  # ("totals", "amount") for "$.totals.amount"; (name,) by default


@dataclass(frozen=True, slots=True)
class TableSpec:
    name: str
    streams: tuple[str, ...]
    mode: Mode = "append"
    columns: tuple[ColumnSpec, ...] = ()
    key: tuple[str, ...] = ()
    types: tuple[str, ...] = ()  # only these event types (empty: all)
    delete_types: tuple[str, ...] = ()  # upsert: these event types delete the key's row
    keep_payload: bool = True

    @property
    def typed(self) -> bool:
        return bool(self.columns)

    def names(self, stream: str) -> bool:
        """True if the section names this stream exactly (not by a pattern)."""
        return stream in self.streams and not is_pattern(stream)

    def matches(self, stream: str) -> bool:
        return any(fnmatch.fnmatchcase(stream, p) for p in self.streams)


def is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def route(tables: tuple[TableSpec, ...], stream: str) -> TableSpec | None:
    """The section a stream's entries go to; None: the default events table."""
    for spec in tables:
        if spec.names(stream):
            return spec
    return next((spec for spec in tables if spec.matches(stream)), None)


def parse_tables(value: Any, where: str) -> tuple[TableSpec, ...]:
    """From a TOML `[tables.<name>]` mapping, or the env form "pattern=table,pattern=table"."""
    if isinstance(value, str):
        return _from_env(value, where)
    if isinstance(value, list | tuple) and not value:
        return ()  # `tables = []`, as the documented defaults file writes it
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must be [tables.<name>] sections (got {value!r})")
    specs = tuple(_section(name, body, f"{where} [tables.{name}]") for name, body in value.items())
    return specs


def parse_streams(value: Any, where: str) -> tuple[str, ...]:
    """A TOML list of names and patterns, or a comma-separated string (env, --set)."""
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",")]
        items = [item for item in items if item]
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        raise ConfigError(f"{where}: must be a list of stream names or patterns (got {value!r})")
    return tuple(dict.fromkeys(_stream(item, where) for item in items))


def _from_env(text: str, where: str) -> tuple[TableSpec, ...]:
    by_table: dict[str, list[str]] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        pattern, sep, table = (x.strip() for x in item.partition("="))
        if not sep or not pattern or not table:
            raise ConfigError(f"{where}: {item!r}: expected STREAM_OR_PATTERN=TABLE")
        by_table.setdefault(_table(table, where), []).append(_stream(pattern, where))
    return tuple(TableSpec(name, tuple(streams)) for name, streams in by_table.items())


def _section(name: str, body: Any, where: str) -> TableSpec:
    _table(name, where)
    if not isinstance(body, Mapping):
        raise ConfigError(f"{where}: must be a section with streams = [...]")
    for key in body:
        if key not in SECTION_KEYS:
            hint = difflib.get_close_matches(key, SECTION_KEYS, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{where}: unknown key {key!r}{suggestion}")
    if "streams" not in body:
        raise ConfigError(f"{where}: streams = [...] is required")
    streams = _list(body["streams"], f"{where} streams")
    if not streams:
        raise ConfigError(f"{where} streams: must name at least one stream or pattern")
    columns = _columns(body.get("columns", {}), f"{where} columns")
    mode, key, delete_types = _mode(body, {c.name for c in columns}, where)
    keep_payload = body.get("keep_payload", True)
    if not isinstance(keep_payload, bool):
        raise ConfigError(f"{where} keep_payload: must be true or false")
    if not keep_payload and not columns:
        raise ConfigError(f"{where} keep_payload: false needs columns (else nothing is kept)")
    return TableSpec(
        name,
        tuple(_stream(s, f"{where} streams") for s in streams),
        mode=mode,
        columns=columns,
        key=key,
        types=tuple(_list(body.get("types", []), f"{where} types")),
        delete_types=delete_types,
        keep_payload=keep_payload,
    )


def _mode(
    body: Mapping[str, Any], columns: set[str], where: str
) -> tuple[Mode, tuple[str, ...], tuple[str, ...]]:
    mode = body.get("mode", "append")
    if mode not in ("append", "upsert"):
        raise ConfigError(f"{where} mode: must be 'append' or 'upsert' (got {mode!r})")
    key = tuple(_list(body.get("key", []), f"{where} key"))
    if mode == "upsert":
        if not columns or not key:
            raise ConfigError(f"{where}: mode = 'upsert' needs columns and key = [columns]")
        missing = [k for k in key if k not in columns]
        if missing:
            raise ConfigError(f"{where} key: {missing[0]!r} is not a declared column")
    elif key:
        raise ConfigError(f"{where} key: only for mode = 'upsert'")
    delete_types = tuple(_list(body.get("delete_types", []), f"{where} delete_types"))
    if delete_types and mode != "upsert":
        raise ConfigError(f"{where} delete_types: only for mode = 'upsert'")
    return mode, key, delete_types


def _columns(value: Any, where: str) -> tuple[ColumnSpec, ...]:
    if not isinstance(value, Mapping):
        raise ConfigError(f'{where}: must be a table of name = "type" (got {value!r})')
    out = []
    for name, decl in value.items():
        here = f"{where} {name}"
        if not COLUMN_NAME.fullmatch(name):
            raise ConfigError(f"{here}: not a valid column name (lower-case letters, digits, _)")
        if name in ENVELOPE_COLUMNS:
            raise ConfigError(f"{here}: {name!r} is an envelope column every table has")
        path: tuple[str, ...] = (name,)
        if isinstance(decl, str):
            pg_type = decl
        elif isinstance(decl, Mapping) and set(decl) <= {"type", "from"} and "type" in decl:
            pg_type = decl["type"]
            source = decl.get("from", f"$.{name}")
            if not isinstance(source, str) or not JSON_PATH.fullmatch(source):
                raise ConfigError(f'{here} from: must be a path like "$.totals.amount"')
            path = tuple(source.split(".")[1:])
        else:
            raise ConfigError(f'{here}: must be "type" or {{ type = "...", from = "$.path" }}')
        if not isinstance(pg_type, str) or not PG_TYPE.fullmatch(pg_type.strip().lower()):
            raise ConfigError(f"{here}: {pg_type!r} is not a Postgres type name streamd accepts")
        out.append(ColumnSpec(name, pg_type.strip().lower(), path))
    return tuple(out)


def _list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: must be a list of non-empty strings (got {value!r})")
    return value


def _table(name: str, where: str) -> str:
    if not TABLE_NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: {name!r} is not a valid table name "
            "(letters, digits, underscore; starts with a letter or underscore; at most 48)"
        )
    return name


def _stream(name: Any, where: str) -> str:
    if not isinstance(name, str) or not STREAM_PATTERN.fullmatch(name):
        raise ConfigError(
            f"{where}: {name!r} is not a valid stream name or pattern "
            "(letters, digits and _ : { } . -, with * ? [ ] for patterns; at most 200)"
        )
    return name
