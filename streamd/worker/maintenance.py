"""Partition upkeep while serve runs: at start and every maintenance_interval_s, in worker 0.

Each round creates the coming partitions of every partitioned events table serve writes into and
drops those retention says are too old (backends/upkeep.py, which also makes sure only one
process drops at a time, whichever host it runs on). A failed round is logged and tried again
at the next interval: upkeep never stops ingest.
"""

from __future__ import annotations

import asyncio

import asyncpg

from streamd.backends.faults import POSTGRES_FAULTS, describe
from streamd.backends.upkeep import UpkeepResult, maintained_tables, upkeep
from streamd.common.aio import wait_event
from streamd.common.text import human_bytes
from streamd.config.settings import Settings
from streamd.observability.log import get_logger


class Maintenance:
    def __init__(self, settings: Settings, pool: asyncpg.Pool, stopping: asyncio.Event) -> None:
        self.settings = settings
        self.pool = pool
        self._stopping = stopping
        self.log = get_logger()
        self.dropped_total = 0
        self._warned: set[str] = set()

    async def run(self) -> None:
        while not self._stopping.is_set():
            await self.run_once()
            await wait_event(self._stopping, self.settings.maintenance_interval_s)

    async def run_once(self) -> None:
        for table in maintained_tables(self.settings):
            try:
                async with self.pool.acquire() as conn:
                    self._report(await upkeep(conn, table, self.settings))
            except POSTGRES_FAULTS as exc:
                self.log.warning(
                    "maintenance_failed",
                    table=table,
                    error=describe(exc),
                    retry_in_s=self.settings.maintenance_interval_s,
                )

    def _report(self, result: UpkeepResult) -> None:
        if not result.partitioned and self.settings.retention and result.table not in self._warned:
            self._warned.add(result.table)
            self.log.warning(
                "retention_needs_partitions",
                table=result.table,
                retention=self.settings.retention,
                fix="streamd db migrate (partition_interval) makes it a partitioned table",
            )
        for name in result.created:
            self.log.info("partition_created", table=result.table, partition=name)
        for part in result.dropped:
            self.dropped_total += 1
            self.log.info(
                "partition_dropped",
                table=result.table,
                partition=part.name,
                rows_estimate=part.rows_estimate,
                size=human_bytes(part.total_bytes),
                dropped_total=self.dropped_total,
            )
        for name in result.postponed:
            self.log.warning(
                "partition_drop_postponed",
                table=result.table,
                partition=name,
                reason="lock_timeout: a long query holds the table",
            )
