-- streamd: a least-privilege PostgreSQL setup (psql script; safe to run again).
--
-- Two roles, one schema:
--   owner_role   owns the schema and streamd's two tables; run `streamd db init` as this role,
--                once at install and after each streamd upgrade (it applies init.sql).
--   ingest_role  runs `streamd serve`. It creates nothing and owns nothing. It needs:
--                  CONNECT on the database, USAGE on the schema,
--                  INSERT and SELECT on the events and dead-letter tables (COPY; INSERT ...
--                    ON CONFLICT DO NOTHING; CREATE TEMP TABLE ... (LIKE events) reads events),
--                  USAGE on the dead-letter table's id sequence (GENERATED ALWAYS AS IDENTITY),
--                  TEMPORARY on the database: a replayed batch (after a crash) is copied into a
--                    temporary staging table, then INSERT ... SELECT ... ON CONFLICT DO NOTHING.
--                No UPDATE, DELETE, TRUNCATE, REFERENCES or TRIGGER on anything; no CREATE.
-- `streamd serve` checks these at start and stops with exit 78 naming what is missing.
--
-- Run as a superuser (it creates roles), before `streamd db init`:
--   psql "postgresql://admin@db.internal/app" -v ON_ERROR_STOP=1 -f conf/least-privilege.sql
-- Variables (psql -v NAME=VALUE), all optional:
--   schema           default streamd          where the tables live (the roles' search_path)
--   owner_role       default streamd_owner
--   ingest_role      default streamd_ingest
--   owner_password, ingest_password           default: none (set one later with \password ROLE;
--                                             a password on a command line ends up in its history)
-- Then:
--   STREAMD_POSTGRES_DSN=postgresql://streamd_owner@db.internal/app streamd db init
--   STREAMD_POSTGRES_DSN=postgresql://streamd_ingest@db.internal/app \
--   STREAMD_POSTGRES_PASSWORD_FILE=/run/credentials/streamd.service/pgpass streamd serve
--
-- Default privileges give the ingest role its grants on tables the owner creates later (any
-- events_table / dlq_table names), so the order "this file, then db init" just works. PUBLIC keeps
-- Postgres' defaults on the database (CONNECT, TEMPORARY); to lock a database down, also
-- REVOKE ALL ON DATABASE ... FROM PUBLIC: this file grants the ingest role what it needs itself.
--
-- Operators' tools: `streamd monitor` and `streamd dlq list` need only what ingest_role has;
-- `streamd dlq replay|purge` also delete dead letters: give an operator role
--   GRANT SELECT, DELETE ON <schema>.dead_letter_queue TO <operator>;

\if :{?schema}
\else
  \set schema streamd
\endif
\if :{?owner_role}
\else
  \set owner_role streamd_owner
\endif
\if :{?ingest_role}
\else
  \set ingest_role streamd_ingest
\endif
SELECT current_database() AS database \gset
SET client_min_messages = warning;  -- quiet on a second run ("already exists, skipping")

-- Roles (created only if missing).
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE', :'owner_role')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'owner_role') \gexec
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT',
              :'ingest_role')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'ingest_role') \gexec
\if :{?owner_password}
  SELECT format('ALTER ROLE %I PASSWORD %L', :'owner_role', :'owner_password') \gexec
\endif
\if :{?ingest_password}
  SELECT format('ALTER ROLE %I PASSWORD %L', :'ingest_role', :'ingest_password') \gexec
\endif

-- The schema, owned by the owner; both roles find the tables through their search_path.
SELECT format('CREATE SCHEMA IF NOT EXISTS %I AUTHORIZATION %I', :'schema', :'owner_role') \gexec
SELECT format('ALTER ROLE %I IN DATABASE %I SET search_path = %I', r, :'database', :'schema')
FROM unnest(ARRAY[:'owner_role', :'ingest_role']) AS r \gexec

-- What the ingest role may do, and nothing more.
SELECT format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', :'database', :'ingest_role') \gexec
SELECT format('GRANT USAGE ON SCHEMA %I TO %I', :'schema', :'ingest_role') \gexec
SELECT format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA %I GRANT SELECT, INSERT ON TABLES TO %I',
              :'owner_role', :'schema', :'ingest_role') \gexec
SELECT format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA %I GRANT USAGE ON SEQUENCES TO %I',
              :'owner_role', :'schema', :'ingest_role') \gexec
-- Tables the owner created before this file ran (running it again after `db init`).
SELECT format('GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA %I TO %I', :'schema', :'ingest_role')
\gexec
SELECT format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA %I TO %I', :'schema', :'ingest_role') \gexec
