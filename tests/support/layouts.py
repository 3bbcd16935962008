"""Events tables as other versions and other programs made them, for tests of existing tables."""

from __future__ import annotations

# streamd's columns, made by hand, without the key: a replay would duplicate every row.
NO_UNIQUE_KEY = """
CREATE TABLE events (
    stream text NOT NULL, entry_id text NOT NULL, event_type text NOT NULL,
    payload jsonb NOT NULL, produced_at timestamptz NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now(), meta jsonb
);
"""
# The layout streamd itself created before the two-bigint key (`streamd db migrate` converts it).
TEXT_KEY = NO_UNIQUE_KEY.replace("meta jsonb\n", "meta jsonb, PRIMARY KEY (stream, entry_id)\n")
