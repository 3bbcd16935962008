"""Settings: one frozen dataclass, resolved once from flags > environment > config file > defaults.

Every key is a dataclass field whose metadata holds its documentation, so `streamd config`,
`conf/streamd.toml` and the docs' reference all describe the same keys. Units live in names
(`block_ms`, `batch_timeout_s`). Values are parsed and checked here, in the parent process; errors
name the key and the source of the bad value (flag, environment variable, file).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from streamd.config.cpus import available_cpus
from streamd.config.sharding import dead_stream_of, expand_shards, logical_stream
from streamd.config.tables import TableSpec, route

ENV_PREFIX = "STREAMD_"
CONFIG_ENV = "STREAMD_CONFIG"
DEFAULT_CONFIG_PATHS = (Path("conf/streamd.toml"), Path("/etc/streamd/streamd.toml"))
SECRET_KEYS = frozenset({"redis_password", "postgres_password"})
MASK = "***"

# Table and stream names end up in SQL and in Redis keys: keep them to plain identifiers.
KEY_NAME = re.compile(r"[A-Za-z0-9_:{}.\-]{1,200}")


def _opt(default: Any, doc: str, **extra: Any) -> Any:
    return field(default=default, metadata={"doc": doc, **extra})


@dataclass(frozen=True, slots=True)
class Settings:
    # --- connections ---
    redis_url: str = _opt(
        "redis://127.0.0.1:6379/0",
        "Redis to read from: redis://, rediss:// (TLS) or unix://. A password in it is masked.",
    )
    redis_password: str = _opt("", "Redis password (overrides the URL's); or redis_password_file.")
    redis_ca_file: str = _opt("", "rediss:// only: CA bundle that signs the server certificate.")
    redis_cert_file: str = _opt("", "rediss:// only: client certificate for mutual TLS.")
    redis_key_file: str = _opt("", "rediss:// only: private key of redis_cert_file.")
    redis_timeout_s: float = _opt(
        10.0, "Timeout of one Redis command (blocking reads get block_ms on top).", min=0.1
    )
    postgres_dsn: str = _opt(
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "Postgres to write to (URI form; sslmode=verify-full, sslrootcert=... for TLS).",
    )
    postgres_password: str = _opt(
        "", "Postgres password (overrides the DSN's); or postgres_password_file."
    )
    postgres_timeout_s: float = _opt(
        30.0, "Timeout of one Postgres statement, enforced by server and client.", min=0.1
    )
    postgres_pooler: Literal["auto", "none", "pgbouncer"] = _opt(
        "auto",
        "A connection pooler in front of Postgres: 'pgbouncer' (or a pooler like it: no "
        "prepared statements kept, timeouts per transaction), 'none', or 'auto' (detected at "
        "connect: a pooler announces a session that is not the server's).",
    )
    redis_cluster: bool | Literal["auto"] = _opt(
        "auto",
        "Redis Cluster mode: true, false, or 'auto' (detected: INFO cluster). In a cluster, "
        "redis_url names any node (the others are learnt from it).",
    )
    startup_wait_s: float = _opt(
        0.0, "At start, keep retrying unreachable Redis/Postgres this long before giving up.", min=0
    )
    # --- names ---
    stream: str = _opt("events", "Redis stream to consume when `streams` is empty.", kind="key")
    streams: tuple[str, ...] = _opt(
        (),
        'Streams to consume: names and glob patterns (* ? [...]), e.g. ["orders", "tenant:*"];'
        " env: comma-separated. Patterns are resolved with SCAN TYPE stream. Empty: `stream`.",
        kind="streams",
    )
    shards: int = _opt(
        1,
        "Shards of each stream named in `stream`/`streams` (not patterns): more than 1 makes"
        " <stream>:{0} ... <stream>:{N-1}, which a Redis Cluster spreads over its masters.",
        min=1,
        max=1024,
    )
    discover_interval_s: float = _opt(
        10.0,
        "How often the patterns in `streams` are resolved again: a stream created later is"
        " consumed within this, with no restart.",
        min=0.1,
    )
    tables: tuple[TableSpec, ...] = _opt(
        (),
        "Routing: [tables.<name>] sections with streams = [names or patterns]; env:"
        ' "orders=orders_events,tenant:*=tenant_events". Unmatched streams go to events_table.',
        kind="tables",
    )
    group: str = _opt("streamd", "Consumer group (created if missing).", kind="key")
    events_table: str = _opt("events", "Postgres table for events.", kind="table")
    dlq_stream: str = _opt(
        "",
        "Dead-letter stream of the single `stream`; empty means '<stream>:dead'. With `streams`,"
        " every stream has its own '<stream>:dead' and this is not used.",
        kind="key",
    )
    # --- partitions and retention (docs/partitions.md) ---
    partition_interval: Literal["hour", "day", "week", "month", ""] = _opt(
        "day",
        "A new events table is partitioned by its entry IDs' time into ranges this long (UTC);"
        ' "": one unpartitioned table. An existing table keeps its layout (streamd db migrate).',
    )
    retention: str = _opt(
        "",
        'Drop partitions entirely older than this, e.g. "30 days", "12 hours"; "": keep all.',
        kind="retention",
    )
    maintenance_interval_s: float = _opt(
        60.0,
        "How often serve creates partitions ahead and applies retention (also done at start).",
        min=1.0,
    )
    dlq_table: str = _opt("dead_letter_queue", "Postgres table for dead letters.", kind="table")
    dlq_stream_maxlen: int = _opt(
        1_000_000, "Approximate cap on the dead-letter stream's length (0: no cap).", min=0
    )
    # --- processes ---
    procs: int | Literal["auto"] = _opt(
        "auto", "Worker processes: 'auto' (one per CPU core available) or a number.", min=1, max=256
    )
    tasks: int = _opt(
        5,
        "Consumer tasks per worker process (with 2 or more, the first is the quiet lane: "
        "it keeps to the streams without a backlog).",
        min=1,
        max=256,
    )
    # --- batching ---
    batch_size: int = _opt(
        2000, "Flush a batch when it holds this many events.", min=1, max=100_000
    )
    batch_timeout_s: float = _opt(
        2.0, "Flush a partial batch after this long (a drained stream flushes at once).", min=0.001
    )
    read_count: int = _opt(
        2000, "Entries asked for per XREADGROUP (COUNT; at most batch_size).", min=1, max=100_000
    )
    block_ms: int = _opt(
        5000, "How long an idle XREADGROUP waits for new entries (BLOCK).", min=1, max=600_000
    )
    max_event_bytes: int = _opt(
        1_048_576, "Entries whose `data` is larger go to the dead-letter queue.", min=1
    )
    keep_extra_fields: bool = _opt(
        False, "Store envelope fields other than type/data/ts in the `meta` JSONB column."
    )
    retry_initial_s: float = _opt(0.1, "First backoff after a transient fault.", min=0.001)
    retry_max_s: float = _opt(10.0, "Backoff cap after repeated transient faults.", min=0.001)
    # --- recovery (reaper) ---
    claim_min_idle_ms: int = _opt(
        60_000, "Reclaim entries pending longer than this from any consumer (XAUTOCLAIM).", min=1
    )
    max_deliveries: int = _opt(
        5, "Entries delivered more times than this go to the dead-letter queue as poison.", min=1
    )
    reaper_interval_s: float = _opt(5.0, "How often each process runs the reaper.", min=0.01)
    trim: bool = _opt(
        True, "Trim the stream below the oldest entry any group still needs (XTRIM MINID)."
    )
    consumer_idle_delete_ms: int = _opt(
        3_600_000, "Delete consumers idle this long that own no pending entries.", min=1
    )
    instance_id: str = _opt(
        "",
        "This serve's name in the group (consumers are <instance_id>:<pid>:<task>); empty: "
        "<hostname>-<random>, new at each start. Unique per running serve.",
        kind="key",
    )
    liveness_ttl_s: float = _opt(
        5.0,
        "Each worker renews a Redis key with this TTL (every TTL/5); when it expires, any "
        "reaper takes over the worker's entries at once, without claim_min_idle_ms.",
        min=0.5,
    )
    # --- supervisor ---
    graceful_timeout_s: float = _opt(
        30.0, "On TERM/INT, wait this long for children to flush and ack, then SIGKILL.", min=0.1
    )
    heartbeat_timeout_s: float = _opt(
        30.0, "Replace a child whose event loop has not sent a heartbeat for this long.", min=0.5
    )
    restart_backoff_max_s: float = _opt(
        30.0, "Cap of the backoff between restarts of a crashing child.", min=0.01
    )
    crash_loop_max: int = _opt(
        10, "Stop the service when children crash this often within crash_loop_window_s.", min=1
    )
    crash_loop_window_s: float = _opt(60.0, "Window for crash_loop_max.", min=0.1)
    state_dir: str = _opt(
        "",
        "Where serve keeps its status files and metrics data; empty: $RUNTIME_DIRECTORY "
        "(systemd) or /tmp/streamd-<uid>.",
    )
    # --- producing (streamd produce, streamd bench) ---
    max_backlog: int = _opt(
        1_000_000,
        "Producers wait while the group's backlog (lag, else stream length) is above this; 0: off.",
        min=0,
    )
    backlog_timeout_s: float = _opt(
        30.0, "How long a producer waits for the backlog to fall before it fails.", min=0
    )
    # --- observability ---
    metrics_host: str = _opt("127.0.0.1", "Address for /metrics, /healthz, /readyz (loopback).")
    metrics_port: int = _opt(
        9465, "Port for /metrics, /healthz, /readyz; 0 disables.", min=0, max=65535
    )
    log_level: Literal["debug", "info", "warning", "error"] = _opt("info", "Lowest level logged.")
    log_format: Literal["auto", "json", "console"] = _opt(
        "auto", "auto: readable on a TTY, JSON lines otherwise."
    )
    log_interval_s: float = _opt(
        10.0,
        "Each worker logs an ingest_progress summary this often (rows, dead letters, lag, "
        "p99 latency); 0: never.",
        min=0,
    )
    slow_batch_s: float = _opt(
        5.0, "Log a batch_slow warning for a batch that takes longer, retries included.", min=0.001
    )

    # --- derived values ---
    @property
    def stream_names(self) -> tuple[str, ...]:
        """What to consume: `streams` (names and patterns), or the one `stream`; with `shards`
        above 1, each name as its shard keys `<name>:{0}` ... (config/sharding.py)."""
        return expand_shards(self.streams or (self.stream,), self.shards)

    def table_for(self, stream: str) -> str:
        """The table a stream's entries go to."""
        spec = route(self.tables, stream) or route(self.tables, logical_stream(stream))
        return spec.name if spec is not None else self.events_table

    @property
    def dead_stream(self) -> str:
        return self.dlq_stream or dead_stream_of(self.stream, self.redis_cluster is True)

    def dead_stream_for(self, stream: str) -> str:
        """A stream's dead-letter stream: `<stream>:dead` (in a cluster, of the stream's slot:
        config/sharding.py); dlq_stream only names the one of the single `stream` (with
        `streams`, each stream has its own)."""
        if stream == self.stream and not self.streams:
            return self.dead_stream
        return dead_stream_of(stream, self.redis_cluster is True)

    @property
    def table_names(self) -> tuple[str, ...]:
        """Every events table serve may write: events_table, then each [tables.<name>] (but
        typed ones, whose sections declare columns: backends/typed_schema.py makes those)."""
        names = (t.name for t in self.tables if not t.typed)
        return tuple(dict.fromkeys((self.events_table, *names)))

    def resolved_state_dir(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        return Path(runtime) if runtime else Path(f"/tmp/streamd-{os.getuid()}")

    def resolved_procs(self) -> int:
        if self.procs == "auto":
            return available_cpus()
        return self.procs

    def masked(self) -> dict[str, Any]:
        """The settings as a dict that is safe to print or log: no password in any form."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_KEYS:
                value = MASK if value else ""
            elif f.name in ("redis_url", "postgres_dsn"):
                value = mask_url(value)
            out[f.name] = value
        return out


def mask_url(url: str) -> str:
    """The URL with any password replaced by ***, and password query parameters masked too."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}{':' + MASK if sep else ''}@{hostport}"
    query = re.sub(r"(?i)(password=)[^&]*", rf"\g<1>{MASK}", parts.query)
    if "://" not in url:
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    # By hand: urlunsplit drops the // of a URL with no host (postgresql:///db?host=/run/pg).
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )
