-- streamd schema: the dead-letter table (the events table's layout depends on partition_interval
-- and is created by backends/layout.py: see docs/partitions.md).
--
-- Applied idempotently by `streamd db init` and by `streamd serve` at start; safe to run by hand
-- (`psql -f init.sql`), which creates the default name `dead_letter_queue`.
-- streamd sets `streamd.events_table` / `streamd.dlq_table` (set_config) before running this file
-- when the config names other tables. Every name goes through format('%I'), so a configured name is
-- always quoted as an identifier and can never inject SQL. Changes to this contract are added below
-- as further idempotent statements (ALTER ... IF NOT EXISTS), never by editing a CREATE in place.
DO $schema$
DECLARE
    events_table text := coalesce(nullif(current_setting('streamd.events_table', true), ''), 'events');
    dlq_table    text := coalesce(nullif(current_setting('streamd.dlq_table', true), ''), 'dead_letter_queue');
BEGIN
    -- Several processes may start at once; one applies the schema, the others wait and find it done.
    PERFORM pg_advisory_xact_lock(hashtext('streamd.schema'));

    -- Entries that could not become a row, with the reason and the raw fields (bytes made safe).
    EXECUTE format($sql$
        CREATE TABLE IF NOT EXISTS %I (
            id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            stream      text        NOT NULL,
            entry_id    text        NOT NULL,
            event_type  text,
            fields      jsonb       NOT NULL,
            reason      text        NOT NULL,  -- short code: missing_type, invalid_json, poison, ...
            error       text        NOT NULL,  -- the precise message
            deliveries  integer     NOT NULL DEFAULT 1,
            failed_at   timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT %I UNIQUE (stream, entry_id)
        )$sql$, dlq_table, dlq_table || '_stream_entry_id_key');
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON %I (failed_at)',
                   dlq_table || '_failed_at_idx', dlq_table);
END
$schema$;
