"""`streams` and `[tables.<name>]`: parsing, routing, and one-line errors for bad sections."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamd.config import Settings, load_settings
from streamd.config.tables import ColumnSpec, route
from streamd.errors import ConfigError


def load(tmp_path: Path, toml: str = "", **env: str) -> Settings:
    path = tmp_path / "streamd.toml"
    path.write_text(toml)
    return load_settings(config_file=str(path), environ=env)[0]


def test_streams_from_toml_list_and_from_env(tmp_path: Path) -> None:
    s = load(tmp_path, 'streams = ["orders", "tenant:*"]\n')
    assert s.stream_names == ("orders", "tenant:*")
    s = load(tmp_path, STREAMD_STREAMS="orders, clicks,tenant:*,orders")
    assert s.stream_names == ("orders", "clicks", "tenant:*")


def test_the_single_stream_key_is_a_one_element_list(tmp_path: Path) -> None:
    s = load(tmp_path, 'stream = "payments"\n')
    assert s.stream_names == ("payments",)


def test_routing_exact_name_beats_pattern_and_unmatched_goes_to_events_table(
    tmp_path: Path,
) -> None:
    s = load(
        tmp_path,
        """
        [tables.tenant_events]
        streams = ["tenant:*"]
        [tables.vip_events]
        streams = ["tenant:vip"]
        """,
    )
    assert s.table_for("tenant:a") == "tenant_events"
    assert s.table_for("tenant:vip") == "vip_events"
    assert s.table_for("clicks") == "events"


def test_env_form_of_tables(tmp_path: Path) -> None:
    s = load(tmp_path, STREAMD_TABLES="orders=orders_events, tenant:*=tenant_events")
    assert [t.name for t in s.tables] == ["orders_events", "tenant_events"]
    spec = route(s.tables, "tenant:x")
    assert spec is not None and spec.name == "tenant_events"


def test_typed_section_is_parsed(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        """
        [tables.orders]
        streams = ["orders"]
        mode = "upsert"
        key = ["order_id"]
        delete_types = ["order_deleted"]
        columns = { order_id = "text", amount = { type = "numeric(12,2)", from = "$.totals.amt" } }
        """,
    )
    (spec,) = s.tables
    assert spec.mode == "upsert" and spec.key == ("order_id",) and spec.typed
    assert spec.columns == (
        ColumnSpec("order_id", "text", ("order_id",)),
        ColumnSpec("amount", "numeric(12,2)", ("totals", "amt")),
    )


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[tables.orders]\n", {}, "streams = [...] is required"),
        ('[tables.orders]\nstreams = ["o"]\nstreem = 1\n', {}, "did you mean 'streams'"),
        ('[tables."bad-name"]\nstreams = ["o"]\n', {}, "not a valid table name"),
        ('[tables.t]\nstreams = ["o o"]\n', {}, "not a valid stream name or pattern"),
        ('[tables.t]\nstreams = ["o"]\nmode = "merge"\n', {}, "must be 'append' or 'upsert'"),
        ('[tables.t]\nstreams = ["o"]\nmode = "upsert"\n', {}, "needs columns and key"),
        (
            '[tables.t]\nstreams = ["o"]\nmode = "upsert"\nkey = ["x"]\ncolumns = {y = "text"}\n',
            {},
            "'x' is not a declared column",
        ),
        ('[tables.t]\nstreams = ["o"]\ncolumns = {a = "text; drop"}\n', {}, "not a Postgres type"),
        ('[tables.t]\nstreams = ["o"]\ncolumns = {stream = "text"}\n', {}, "envelope column"),
        ('[tables.t]\nstreams = ["o"]\ncolumns = {a = {type = "int", from = "a"}}\n', {}, "path"),
        ("[other]\nx = 1\n", {}, "the only sections are [tables.<name>]"),
        ("", {"STREAMD_TABLES": "orders"}, "expected STREAM_OR_PATTERN=TABLE"),
        ("", {"STREAMD_STREAMS": "a,b c"}, "not a valid stream name or pattern"),
        ('streams = "a"\nstreams_x = 1\n', {}, "unknown config key 'streams_x'"),
    ],
)
def test_bad_sections_are_one_line_errors(
    tmp_path: Path, toml: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, toml, **env)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
