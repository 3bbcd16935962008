"""How `streamd bench` checks its run in Postgres: exactly once per stream, latency, commit span.

Every event of a run carries the run's id, a sequence number (unique across the run's streams) and
its send time in microseconds, so one query over the run's entry-ID range answers it all."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from streamd.backends.sql import quote_ident
from streamd.config.settings import Settings


@dataclass(slots=True)
class Verified:
    persisted: int = 0
    distinct: int = 0
    dead: int = 0
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    commit_span_s: float | None = None
    clock: str = ""
    per_stream: dict[str, int] = field(default_factory=dict)  # stream -> distinct events


class RunRows:
    """Queries over this run's rows: the run's entry-ID range (the primary key's index), then
    its id in the payload (other producers may write into the same range)."""

    def __init__(
        self,
        settings: Settings,
        conn: asyncpg.Connection,
        run_id: str,
        streams: Sequence[str] = (),
    ) -> None:
        self.settings = settings
        self.conn = conn
        self.run_id = run_id
        self.streams = list(streams) or [settings.stream]
        self.events = quote_ident(settings.events_table)
        self.dlq = quote_ident(settings.dlq_table)

    def _where(self, first_id: str, last_id: str) -> tuple[str, list[Any]]:
        # Millisecond bounds compare correctly as text in any collation: every ID of the run
        # starts with a 13-digit millisecond count between them.
        low = first_id.partition("-")[0]
        high = str(int(last_id.partition("-")[0]) + 1)
        clause = "stream = ANY($1::text[]) AND entry_id >= $2 AND entry_id < $3"
        return clause, [self.streams, low, high]

    async def count(self, first_id: str, last_id: str) -> tuple[int, int]:
        """(distinct events persisted, dead letters) so far."""
        where, args = self._where(first_id, last_id)
        persisted = await self.conn.fetchval(
            f"SELECT count(DISTINCT payload->>'seq') FROM {self.events} "
            f"WHERE {where} AND payload->>'bench_run' = $4",
            *args,
            self.run_id,
        )
        dead = await self.conn.fetchval(
            f"SELECT count(*) FROM {self.dlq} WHERE {where} AND fields->>'data' LIKE $4",
            *args,
            f'%"bench_run":"{self.run_id}"%',
        )
        return int(persisted), int(dead)

    async def verify(self, first_id: str, last_id: str) -> Verified:
        tracked = await self.conn.fetchval("SELECT current_setting('track_commit_timestamp')")
        if tracked == "on":
            commit, clock = "pg_xact_commit_timestamp(xmin)", "commit timestamp"
        else:
            commit, clock = "ingested_at", "ingested_at (transaction start)"
        where, args = self._where(first_id, last_id)
        row = await self.conn.fetchrow(
            f"""
            WITH r AS (
                SELECT payload->>'seq' AS seq, {commit} AS committed,
                       (payload->>'sent_us')::bigint AS sent_us
                FROM {self.events} WHERE {where} AND payload->>'bench_run' = $4
            ), l AS (
                SELECT seq, committed,
                       extract(epoch FROM committed) * 1000 - sent_us / 1000.0 AS ms
                FROM r
            )
            SELECT count(*) AS persisted, count(DISTINCT seq) AS distinct_seq,
                   percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY ms) AS pcts,
                   max(ms) AS max_ms,
                   extract(epoch FROM max(committed) - min(committed)) AS span_s
            FROM l
            """,
            *args,
            self.run_id,
        )
        _, dead = await self.count(first_id, last_id)
        per_stream = await self.conn.fetch(
            f"SELECT stream, count(DISTINCT payload->>'seq') AS n FROM {self.events} "
            f"WHERE {where} AND payload->>'bench_run' = $4 GROUP BY stream",
            *args,
            self.run_id,
        )
        pcts = row["pcts"] or [None, None, None]
        latency = dict(zip(("p50", "p95", "p99"), pcts, strict=True)) | {"max": row["max_ms"]}
        return Verified(
            persisted=row["persisted"],
            distinct=row["distinct_seq"],
            dead=dead,
            latency_ms={k: None if v is None else round(float(v), 2) for k, v in latency.items()},
            commit_span_s=float(row["span_s"]) if row["span_s"] else None,
            clock=clock,
            per_stream=dict.fromkeys(self.streams, 0) | {r["stream"]: r["n"] for r in per_stream},
        )
