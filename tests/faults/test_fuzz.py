"""Fuzzed input through the real `streamd serve`: hypothesis makes stream entries (random field
sets, odd bytes, huge and deeply nested JSON, every kind of value Postgres refuses) and XADDs each
batch with known-good canaries between them. Every entry must end up exactly one way:

- ingested: its payload equals what Postgres itself parses from its `data`, its type and time are
  right, its extra fields are in `meta`; or
- dead-lettered: with the reason the envelope rules (or Postgres' refusal) give, and the raw
  entry recoverable byte for byte from the dead-letter row.

The oracle is independent of streamd's code: the envelope rules as the docs state them, and
Postgres asked directly (`convert_from(data, 'UTF8')::jsonb`). The canaries, and the serve process
staying up and answering within a bound for every batch, show that nothing crashes, stalls, or
takes a good neighbour down with it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from streamd.pipeline.dead_letters import decode_fields
from tests.support.helpers import ServeProcess, pending_count, redis_client, run_async, wait_until

pytestmark = pytest.mark.timeout(300)

MAX_EVENT_BYTES = 256 * 1024
MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
MAX_TS_DIGITS = 20  # leading zeros allowed up to this length
ENVELOPE = (b"type", b"data", b"ts")
# Every dead-letter reason of docs/dead-letters.md but `deleted` and `poison`
# (tests/integration/test_supervisor.py).
REASONS = {
    "missing_type",
    "empty_type",
    "type_too_long",
    "missing_data",
    "oversize",
    "invalid_ts",
    "duplicate_field",
    "invalid_json",
    "invalid_encoding",
    "too_deeply_nested",
    "rejected_by_postgres",
}
POSTGRES_REASONS = {
    "22P02": "invalid_json",
    "22P05": "invalid_json",
    "22021": "invalid_encoding",
    "54001": "too_deeply_nested",
}

# --- strategies ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _string_of(size: int) -> bytes:
    return b'"' + b"x" * (size - 2) + b'"'


# Values Postgres (or the envelope) refuses, and their valid neighbours.
SPECIAL_DATA = [
    b"",
    b" ",
    b"{}",
    b"null",
    b'{"a": "\\u0000"}',  # jsonb cannot hold NUL
    b'{"a": "x\x00y"}',  # a raw NUL byte
    b'{"a": "\\ud800"}',  # a lone surrogate
    b'{"a": "\\udc00\\ud800"}',
    b'{"a": "\\ud83d\\ude00"}',  # a valid pair
    b'{"a": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8: not UTF-8
    b'{"a": "\xff\xfe"}',
    b'{"a": "caf\xc3\xa9"}',
    b"1e1000000",  # beyond numeric's range
    b"-1e-1000000",
    b"1e308",
    b"123456789012345678901234567890",
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"-0",
    b'{"a": 1, "a": 2}',  # duplicate keys: jsonb keeps the last
    b"[1, 2,]",
    b"{'a': 1}",
    b"\xef\xbb\xbf{}",  # a byte order mark
    _nested(64),
    _nested(5_000),
    _nested(100_000),  # deeper than Postgres' stack allows
    _string_of(MAX_EVENT_BYTES - 1),
    _string_of(MAX_EVENT_BYTES),
    _string_of(MAX_EVENT_BYTES + 1),
]

SPECIAL_TYPES = [
    b"user_created",
    b"",
    b"t" * 128,
    b"t" * 129,
    "é".encode() * 64,  # 128 bytes
    "é".encode() * 65,
    b"bad\xff",
    b"nul\x00byte",
    b"\xed\xa0\x80",
    b"with space",
]

SPECIAL_TS = [
    b"0",
    b"1",
    b"1764000000000",
    b"0001764000000000",
    str(MAX_TS_MS).encode(),
    str(MAX_TS_MS + 1).encode(),
    b"9" * 17,
    b"0" * 19 + b"1",
    b"0" * 20 + b"1",
    b"-1",
    b"+5",
    b"1.5",
    b"",
    b" 1",
    "١٢".encode(),  # Arabic-Indic digits
    b"1e3",
]

data_values = st.one_of(
    json_values.map(lambda v: json.dumps(v, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from(SPECIAL_DATA),
    st.sampled_from(SPECIAL_DATA),
    st.binary(max_size=64),
)
type_values = st.one_of(
    st.sampled_from([b"user_created", b"order_placed"]),
    st.sampled_from([b"user_created", b"order_placed"]),
    st.sampled_from(SPECIAL_TYPES),
    st.binary(min_size=1, max_size=140),
)
ts_values = st.sampled_from(SPECIAL_TS) | st.binary(max_size=18)
odd_names = st.binary(max_size=12) | st.sampled_from([b"meta", b"source", b"\x00", b"$base64:x"])
# How often an envelope field is there: sampled_from draws evenly (a float would lean to 0).
PRESENT = {
    b"type": [True] * 9 + [False],
    b"data": [True] * 9 + [False],
    b"ts": [True, False, False],
}
TWICE = [True] + [False] * 24


@st.composite
def entries(draw: st.DrawFn) -> list[bytes]:
    """A flat [name, value, ...] field list: the envelope fields, each present or not (or twice),
    extra fields with arbitrary names, in any order."""
    pairs: list[tuple[bytes, bytes]] = []
    for name, values in ((b"type", type_values), (b"data", data_values), (b"ts", ts_values)):
        if draw(st.sampled_from(PRESENT[name])):
            pairs.append((name, draw(values)))
            if draw(st.sampled_from(TWICE)):
                pairs.append((name, draw(values)))  # the same envelope field twice
    pairs += draw(st.lists(st.tuples(odd_names, st.binary(max_size=20)), max_size=3))
    if not pairs:
        pairs.append((b"x", b""))  # XADD needs at least one field
    pairs = draw(st.permutations(pairs))
    return [part for pair in pairs for part in pair]


def special_entries() -> list[list[bytes]]:
    """Every special value once, with valid other fields: covered in every run, whatever
    hypothesis draws."""
    out = [[b"type", b"t", b"data", data] for data in SPECIAL_DATA]
    out += [[b"type", t, b"data", b"{}"] for t in SPECIAL_TYPES]
    out += [[b"type", b"t", b"data", b"{}", b"ts", ts] for ts in SPECIAL_TS]
    out += [
        [b"data", b"{}"],
        [b"type", b"t"],
        [b"type", b"t", b"data", b"{}", b"type", b"t"],
        [b"type", b"t", b"data", b"{}", b"data", b"{}"],
        [b"type", b"t", b"ts", b"1", b"data", b"{}", b"ts", b"1"],
        [b"\xff\x00", b"odd name", b"type", b"t", b"data", b"{}", b"", b"empty name"],
        [b"type", b"t", b"data", b"{}", b"x", b"1", b"x", b"2"],  # an extra field twice: fine
    ]
    return out


# --- the oracle ------------------------------------------------------------------------------


@dataclass
class Expected:
    reason: str | None  # a dead-letter reason, or None for "ingested"
    event_type: str = ""
    payload_sql_arg: bytes = b""
    ts_ms: int | None = None
    meta: dict[str, str] | None = None


def envelope_reason(fields: list[bytes]) -> str | None:
    """docs/producing.md's envelope rules (None: the envelope is fine, Postgres decides)."""
    names = fields[0::2]
    if any(names.count(name) > 1 for name in ENVELOPE):
        return "duplicate_field"
    first = dict(reversed(list(zip(names, fields[1::2], strict=True))))  # first occurrence wins
    event_type, data, ts = first.get(b"type"), first.get(b"data"), first.get(b"ts")
    if event_type is None:
        return "missing_type"
    if event_type == b"":
        return "empty_type"
    if len(event_type) > 128:
        return "type_too_long"
    if data is None:
        return "missing_data"
    if len(data) > MAX_EVENT_BYTES:
        return "oversize"
    if ts is not None and not (
        ts.isascii() and ts.isdigit() and len(ts) <= MAX_TS_DIGITS and int(ts) <= MAX_TS_MS
    ):
        return "invalid_ts"
    return None


async def postgres_verdict(conn: asyncpg.Connection, event_type: bytes, data: bytes) -> str | None:
    """None if Postgres takes both values as they are, else the reason its refusal maps to."""
    try:
        await conn.fetchval("SELECT convert_from($1, 'UTF8')", event_type)
        await conn.fetchval("SELECT convert_from($1, 'UTF8')::jsonb", data)
    except asyncpg.PostgresError as exc:
        return POSTGRES_REASONS.get(exc.sqlstate or "", "rejected_by_postgres")
    return None


def extra_fields(fields: list[bytes]) -> dict[str, str] | None:
    """meta (keep_extra_fields on): the non-envelope fields (the first value of a repeated name)
    as text, invalid UTF-8 replaced and NUL dropped (jsonb holds neither)."""
    first: dict[bytes, bytes] = {}
    for name, value in zip(fields[0::2], fields[1::2], strict=True):
        first.setdefault(name, value)
    out = {_text(k): _text(v) for k, v in first.items() if k not in ENVELOPE}
    return out or None


def pairs(fields: list[bytes]) -> list[tuple[bytes, bytes]]:
    return sorted(zip(fields[0::2], fields[1::2], strict=True))


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").replace("\x00", "")


# --- the serve under test ----------------------------------------------------------------------


@pytest.fixture
def fuzz_serve(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> Iterator[tuple[dict[str, str], ServeProcess]]:
    environ = {
        **env,
        "STREAMD_MAX_EVENT_BYTES": str(MAX_EVENT_BYTES),
        "STREAMD_KEEP_EXTRA_FIELDS": "true",
        "STREAMD_TASKS": "2",
        "STREAMD_BATCH_SIZE": "50",
    }
    serve = start_serve(environ=environ)
    serve.wait_ready()
    yield environ, serve
    assert serve.poll() is None, serve.tail(40)
    assert not serve.events("worker_crashed"), serve.tail(40)
    assert not serve.events("child_exited"), serve.tail(40)
    assert serve.terminate() == 0


def xadd_raw(url: str, batch: list[list[bytes]]) -> list[str]:
    with redis_client(url) as r:
        pipe = r.pipeline(transaction=False)
        for fields in batch:
            pipe.execute_command("XADD", "events", "*", *fields)
        return [i.decode() for i in pipe.execute()]


CANARY = [b"type", b"canary", b"data", b'{"canary": true}']


def run_batch(environ: dict[str, str], serve: ServeProcess, batch: list[list[bytes]]) -> list[str]:
    """XADD the batch with a canary before and after each entry; wait until every one is
    accounted for (a bound: a stall fails here); check each against the oracle. Returns each
    entry's fate."""
    url, dsn = environ["STREAMD_REDIS_URL"], environ["STREAMD_POSTGRES_DSN"]
    sent = [CANARY]
    for fields in batch:
        sent += [fields, CANARY]
    ids = xadd_raw(url, sent)
    wait_until(
        lambda: run_async(lambda: _accounted(dsn, ids)) == len(ids),
        timeout=30,
        message=f"every entry ingested or dead-lettered; {serve.tail(10)}",
    )
    outcomes = run_async(lambda: _check(dsn, ids, sent))
    wait_until(lambda: pending_count(url) == 0, timeout=20)
    return outcomes


def test_every_special_value_once(fuzz_serve: tuple[dict[str, str], ServeProcess]) -> None:
    outcomes = set(run_batch(*fuzz_serve, special_entries()))
    assert outcomes == {"ingested", *REASONS}, "every fate is reached"


@settings(
    max_examples=int(os.environ.get("STREAMD_FUZZ_EXAMPLES", "30")),  # more: a longer hunt
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(batch=st.lists(entries(), min_size=1, max_size=8))
def test_every_entry_is_ingested_as_postgres_parses_it_or_dead_lettered_with_a_reason(
    fuzz_serve: tuple[dict[str, str], ServeProcess], batch: list[list[bytes]]
) -> None:
    for outcome in run_batch(*fuzz_serve, batch):
        event(f"entry: {outcome}")  # --hypothesis-show-statistics: what was covered


async def _accounted(dsn: str, ids: list[str]) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT (SELECT count(*) FROM events WHERE entry_id = ANY($1))"
                " + (SELECT count(*) FROM dead_letter_queue WHERE entry_id = ANY($1))",
                ids,
            )
        )
    finally:
        await conn.close()


async def _check(dsn: str, ids: list[str], sent: list[list[bytes]]) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return [await _check_one(conn, i, fields) for i, fields in zip(ids, sent, strict=True)]
    finally:
        await conn.close()


async def _check_one(conn: asyncpg.Connection, entry_id: str, fields: list[bytes]) -> str:
    """Asserts the entry's fate; returns it (a dead-letter reason, or 'ingested')."""
    row = await conn.fetchrow(
        "SELECT event_type, payload::text AS payload, meta::text AS meta,"
        " (extract(epoch FROM produced_at) * 1000)::bigint AS ms FROM events WHERE entry_id = $1",
        entry_id,
    )
    dead = await conn.fetchrow(
        "SELECT reason, error, fields::text AS fields FROM dead_letter_queue WHERE entry_id = $1",
        entry_id,
    )
    shown = f"entry {entry_id} {fields!r:.300}"
    reason = envelope_reason(fields)
    if reason is None:
        first = dict(reversed(list(zip(fields[0::2], fields[1::2], strict=True))))
        reason = await postgres_verdict(conn, first[b"type"], first[b"data"])
    if reason is not None:
        assert row is None, f"{shown}: ingested, expected dead letter {reason}"
        assert dead is not None, f"{shown}: neither ingested nor dead-lettered"
        assert dead["reason"] == reason, f"{shown}: {dict(dead)}"
        assert dead["error"], shown
        # Every name and value, byte for byte; not their order (a jsonb object sorts its keys).
        assert pairs(decode_fields(orjson.loads(dead["fields"]))) == pairs(fields), shown
        return reason
    assert dead is None, f"{shown}: dead-lettered ({dict(dead)}), expected a row"  # type: ignore[arg-type]
    assert row is not None, f"{shown}: missing"
    first = dict(reversed(list(zip(fields[0::2], fields[1::2], strict=True))))
    assert row["event_type"] == first[b"type"].decode(), shown
    same = await conn.fetchval(
        "SELECT $1::jsonb = convert_from($2, 'UTF8')::jsonb", row["payload"], first[b"data"]
    )
    assert same, f"{shown}: payload {row['payload']:.200} differs from Postgres' own parse"
    ts = first.get(b"ts")
    assert row["ms"] == (int(ts) if ts is not None else int(entry_id.split("-")[0])), shown
    expected_meta = extra_fields(fields)
    got_meta = orjson.loads(row["meta"]) if row["meta"] is not None else None
    assert got_meta == expected_meta, f"{shown}: meta {got_meta!r}"
    return "ingested"
