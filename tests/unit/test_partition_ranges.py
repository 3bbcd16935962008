"""Partition ranges, names, gaps and retention cutoffs: pure arithmetic on epoch milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from streamd.backends.partitions import (
    Coverage,
    Partition,
    _gaps,
    ahead,
    bounds,
    partition_name,
)
from streamd.backends.upkeep import retention_cutoff
from streamd.config.durations import Retention, parse_retention
from streamd.config.sources import load_settings
from streamd.errors import ConfigError


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


@pytest.mark.parametrize(
    ("interval", "at", "start", "end", "name"),
    [
        (
            "hour",
            "2026-12-01T13:59:59.999",
            "2026-12-01T13:00",
            "2026-12-01T14:00",
            "t_p2026120113",
        ),
        ("day", "2026-12-31T23:59:59.999", "2026-12-31", "2027-01-01", "t_p20261231"),
        ("week", "2026-12-06T12:00", "2026-11-30", "2026-12-07", "t_p20261130"),  # a Sunday
        ("week", "2026-11-30T00:00", "2026-11-30", "2026-12-07", "t_p20261130"),  # its Monday
        ("month", "2026-12-15T00:00", "2026-12-01", "2027-01-01", "t_p202612"),
        ("month", "2024-02-29T23:00", "2024-02-01", "2024-03-01", "t_p202402"),
        ("day", "1970-01-01T00:00:00.001", "1970-01-01", "1970-01-02", "t_p19700101"),
    ],
)
def test_bounds_and_names(interval: str, at: str, start: str, end: str, name: str) -> None:
    assert bounds(interval, ms(at)) == (ms(start), ms(end))
    assert partition_name("t", interval, ms(start)) == name


def test_ahead_is_the_current_interval_and_the_next_ones() -> None:
    got = ahead("month", ms("2026-11-20T00:00"), 2)
    assert got == [
        (ms("2026-11-01"), ms("2026-12-01")),
        (ms("2026-12-01"), ms("2027-01-01")),
        (ms("2027-01-01"), ms("2027-02-01")),
    ]


def test_gaps_respect_partitions_of_another_interval() -> None:
    hours = [Partition("h1", 0, 3_600_000), Partition("h3", 7_200_000, 10_800_000)]
    assert _gaps(0, 86_400_000, hours) == [(3_600_000, 7_200_000), (10_800_000, 86_400_000)]
    assert _gaps(0, 3_600_000, hours) == []
    day = [Partition("d", 0, 86_400_000)]
    assert _gaps(3_600_000, 7_200_000, day) == []  # an hour inside an existing day


def test_the_partition_a_batch_is_copied_into_holds_every_time_given() -> None:
    coverage = Coverage("t", "hour")
    assert coverage.holding([5]) is None  # nothing known yet
    coverage._known = [Partition("h0", 0, 3_600_000), Partition("h1", 3_600_000, 7_200_000)]
    assert coverage.holding([5, 3_599_999, 17]) == coverage._known[0]
    assert coverage.holding([3_600_000]) == coverage._known[1]
    assert coverage.holding([5, 3_600_000]) is None  # across the boundary: the table routes
    assert coverage.holding([7_200_000]) is None
    assert coverage.holding([]) is None


@pytest.mark.parametrize(
    ("retention", "at", "cutoff"),
    [
        (Retention(30, "day"), "2026-05-20T00:30", "2026-04-20T00:30"),
        (Retention(12, "hour"), "2026-05-20T00:30", "2026-05-19T12:30"),
        (Retention(2, "week"), "2026-05-20T00:30", "2026-05-06T00:30"),
        (Retention(1, "month"), "2026-03-31T10:00", "2026-02-28T10:00"),
        (Retention(14, "month"), "2026-03-15T00:00", "2025-01-15T00:00"),
    ],
)
def test_retention_cutoff(retention: Retention, at: str, cutoff: str) -> None:
    assert retention_cutoff(retention, ms(at)) == ms(cutoff)


def test_retention_is_parsed_and_a_bad_one_names_the_key() -> None:
    assert parse_retention("") is None
    assert parse_retention(" 30 days ") == Retention(30, "day")
    assert parse_retention("1 Month") == Retention(1, "month")
    for bad in ("30", "0 days", "thirty days", "5 years", "-1 day"):
        with pytest.raises(ValueError):
            parse_retention(bad)
    with pytest.raises(ConfigError, match=r"retention \(env STREAMD_RETENTION\): must be"):
        load_settings(environ={"STREAMD_RETENTION": "a month"})


def test_partition_interval_accepts_empty_and_refuses_others() -> None:
    env = {}
    assert (
        load_settings(environ={**env, "STREAMD_PARTITION_INTERVAL": ""})[0].partition_interval == ""
    )
    with pytest.raises(ConfigError, match="partition_interval"):
        load_settings(environ={**env, "STREAMD_PARTITION_INTERVAL": "year"})
