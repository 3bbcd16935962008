"""What `serve` runs in Redis, for the start-up check of its ACL (backends/redis_acl.py): the
consumers' reads and acks, the dead-letter script, the reaper's claims, views and trim, the
metrics child's figures, and CLIENT UNBLOCK for a fast drain. Per stream: a function of the
stream's name and its dead-letter stream."""

from __future__ import annotations

from streamd.backends.redis_acl import Need, database_needs, script_needs
from streamd.config.settings import Settings
from streamd.config.tables import is_pattern
from streamd.pipeline.dead_letters import ACK_AND_DEAD_LETTER
from streamd.worker.reaper import DELETE_IF_IDLE


def _without_unblock(settings: Settings) -> str:
    return (
        "a drain (SIGTERM, SIGHUP) cannot wake reads blocked in XREADGROUP: each ends by itself "
        f"after block_ms ({settings.block_ms} ms), so stopping takes up to that much longer"
    )


_WITHOUT_FIGURES = (
    "the metrics child cannot read the stream's figures: /metrics shows streamd_redis_up 0 and "
    "no length, lag or pending"
)


def stream_needs(settings: Settings, stream: str, dead_stream: str) -> list[Need]:
    """The commands serve runs on one stream (and its dead-letter stream)."""
    needs = [
        Need("xgroup|create", stream),  # the group, at start and when it was deleted
        Need("xreadgroup", stream),
        Need("xack", stream),
        Need("xclaim", stream),  # lease renewals; the reaper's adoption of dead consumers
        Need("xautoclaim", stream),  # the reaper's reclaim of stale entries
        Need("xpending", stream),
        Need("xinfo|consumers", stream),  # the reaper: dead and idle consumers
        Need("xinfo|groups", stream),  # the reaper: the group's position (XGROUP SETID)
        *script_needs(ACK_AND_DEAD_LETTER, [stream, dead_stream]),
        *script_needs(DELETE_IF_IDLE, [stream]),
    ]
    if settings.trim:
        needs.append(Need("xtrim", stream))
    if settings.metrics_port:
        needs += [
            Need("xlen", stream, effect=_WITHOUT_FIGURES),
            Need("xlen", dead_stream, effect=_WITHOUT_FIGURES),
            Need("xinfo|groups", stream, effect=_WITHOUT_FIGURES),
        ]
    return needs


def serve_needs(settings: Settings) -> list[Need]:
    """For each name and pattern of `streams` (a pattern stands for the keys it matches, as an
    ACL key pattern does), and SCAN to resolve the patterns."""
    unblock = _without_unblock(settings)
    per_stream = [
        need
        for name in settings.stream_names
        for need in stream_needs(settings, name, settings.dead_stream_for(name))
    ]
    patterns = [Need("scan")] if any(is_pattern(n) for n in settings.stream_names) else []
    return [
        Need("ping"),
        *database_needs(settings),
        *per_stream,
        *patterns,
        Need("client|id", effect=unblock),
        Need("client|unblock", effect=unblock),
    ]
