"""Redis ACLs: a user that lacks a command serve needs is stopped at start with exit 78 and one
line naming the commands and the ACL SETUSER rule that grants them; an optional one (CLIENT
UNBLOCK) is a warning; a permission revoked while serve runs is an error line naming the command,
and serve resumes once it is granted again; the documented minimal ACLs are enough."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import orjson
import pytest
import redis

from streamd.backends.preflight import check_redis
from streamd.backends.redis_acl import refused, username
from streamd.cli.acl_rules import acl_rules
from streamd.config import Settings, load_settings
from streamd.dev.servers import RedisServer
from streamd.errors import EXIT_BOOT, BootError
from streamd.worker.redis_needs import serve_needs
from tests.support.helpers import (
    ServeProcess,
    count_rows,
    event,
    pending_count,
    wait_until,
    xadd,
)
from tests.support.streamd_cli import explain, run_streamd

pytestmark = pytest.mark.timeout(120)

User = Callable[..., dict[str, str]]
ALL = ("~*", "+@all")
# Every command serve cannot run without, as the check names them.
REQUIRED = sorted({n.command for n in serve_needs(Settings()) if not n.optional})


def settings_of(environ: dict[str, str]) -> Settings:
    return load_settings(environ=environ)[0]


def admin(environ: dict[str, str], redis_server: RedisServer) -> redis.Redis:
    """A client of the shared Redis as its default (all-powerful) user, on the test's database."""
    db = int(urlsplit(environ["STREAMD_REDIS_URL"]).path.strip("/") or 0)
    return redis.Redis(port=redis_server.port, db=db)


# --- the start-up check, in process ----------------------------------------------------------


@pytest.mark.parametrize("dry_run", [True, False], ids=["acl-dryrun", "probes"])
@pytest.mark.parametrize("command", REQUIRED)
async def test_each_missing_command_is_a_boot_error_naming_it_and_the_rule(
    command: str, dry_run: bool, acl_user: User
) -> None:
    """With ACL DRYRUN (the user may run it) and without (probes), the same answer: exactly the
    command that is missing, and the rule that adds it and nothing else."""
    extra = () if dry_run else ("-acl|dryrun",)
    settings = settings_of(acl_user(*ALL, f"-{command}", *extra))
    user = username(settings)
    with pytest.raises(BootError) as caught:
        await check_redis(settings, needs=serve_needs(settings))
    message = str(caught.value)
    assert command.upper().replace("|", " ") in message
    assert f"allow it with: ACL SETUSER {user} +{command} (" in message
    assert "\n" not in message and "pw" not in message


async def test_probes_touch_nothing(acl_user: User, redis_server: RedisServer) -> None:
    """Without ACL DRYRUN the check sends each command for real: nothing may come of it (no
    group, no entry, no stream), but the scripts it loads."""
    environ = acl_user(*ALL, "-acl|dryrun")
    settings = settings_of(environ)
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        assert await refused(client, serve_needs(settings), username(settings)) == []
    finally:
        await client.aclose()
    with admin(environ, redis_server) as r:
        assert r.dbsize() == 0  # not the stream, not the dead stream, not a group


async def test_a_key_outside_the_users_patterns_is_named_with_its_rule(acl_user: User) -> None:
    settings = settings_of(acl_user("~events", "~streamd:live:*", "+@all"))
    with pytest.raises(BootError) as caught:
        await check_redis(settings, needs=serve_needs(settings))
    message = str(caught.value)
    assert "access the key 'events:dead'" in message
    assert f"ACL SETUSER {username(settings)} ~events:dead (" in message


async def test_a_missing_select_is_named_too(acl_user: User) -> None:
    """The URL's database number is selected at connect: its refusal comes first."""
    settings = settings_of(acl_user(*ALL, "-select"))
    assert urlsplit(settings.redis_url).path not in ("", "/0")
    with pytest.raises(BootError, match=r"run SELECT, .*ACL SETUSER \S+ \+select \("):
        await check_redis(settings, needs=serve_needs(settings))


@pytest.mark.parametrize("command", ["client|unblock", "client|id"])
async def test_client_unblock_and_id_are_optional(command: str, acl_user: User) -> None:
    settings = settings_of(acl_user(*ALL, f"-{command}"))
    (optional,) = await check_redis(settings, needs=serve_needs(settings))
    assert optional.need.command == command
    assert "block_ms" in optional.need.effect


# --- the real serve ----------------------------------------------------------------------------


def test_serve_without_xinfo_exits_78_with_one_line_at_once(
    acl_user: User, start_serve: Callable[..., ServeProcess]
) -> None:
    """Before: a worker whose heartbeat stopped, killed and restarted every 30 s, nothing in the
    log naming the cause."""
    environ = acl_user(*ALL, "-xinfo")
    serve = start_serve(environ=environ)
    assert serve.wait(30) == EXIT_BOOT
    last = serve.output().strip().splitlines()[-1]
    assert last.startswith("streamd: error: Redis at redis://acl")
    assert "run XINFO CONSUMERS, XINFO GROUPS, which serve needs" in last
    assert "+xinfo|consumers +xinfo|groups" in last
    assert "Traceback" not in serve.output() and ":pw@" not in serve.output()
    assert not serve.events("child_restarted")


def test_serve_without_scripting_exits_78(
    acl_user: User, start_serve: Callable[..., ServeProcess]
) -> None:
    """Before: a crash loop with a traceback on the first dead letter, good events stuck."""
    result = run_streamd(acl_user(*ALL, "-@scripting"), "serve")
    assert result.returncode == EXIT_BOOT, explain(result)
    assert "run EVALSHA, SCRIPT LOAD, which serve needs" in result.stderr.splitlines()[-1]


def test_serve_without_client_unblock_warns_and_its_drain_waits_block_ms(
    acl_user: User, start_serve: Callable[..., ServeProcess]
) -> None:
    """Before: a drain silently seconds slower. Now a warning at start says so, and once more
    when the drain meets the refusal; nothing is lost."""
    environ = acl_user(*ALL, "-client|unblock") | {"STREAMD_BLOCK_MS": "1500"}
    serve = start_serve(environ=environ)
    serve.wait_ready()
    (warning,) = serve.events("redis_permission_missing")
    assert warning["commands"] == ["client|unblock"]
    assert "1500 ms" in warning["effect"] and warning["fix"].endswith("+client|unblock")
    ids = xadd(environ["STREAMD_REDIS_URL"], [event("t", {"i": i}) for i in range(50)])
    dsn = environ["STREAMD_POSTGRES_DSN"]
    wait_until(lambda: count_rows(dsn) == len(ids), timeout=20)
    assert serve.terminate() == 0
    assert serve.events("drain_without_unblock")
    assert serve.events("worker_drained")


def test_serve_without_client_id_still_ingests(
    acl_user: User, start_serve: Callable[..., ServeProcess]
) -> None:
    environ = acl_user(*ALL, "-client|id")
    serve = start_serve(environ=environ)
    serve.wait_ready()
    assert serve.events("redis_permission_missing")[0]["commands"] == ["client|id"]
    ids = xadd(environ["STREAMD_REDIS_URL"], [event("t", {"i": i}) for i in range(50)])
    wait_until(lambda: count_rows(environ["STREAMD_POSTGRES_DSN"]) == len(ids), timeout=20)
    assert serve.terminate() == 0


def test_serve_with_exactly_the_documented_minimal_acl(
    acl_user: User, start_serve: Callable[..., ServeProcess]
) -> None:
    """`streamd config --redis-acl`'s serve rule is enough for everything serve does: ingest,
    dead letters, the reaper (with trim), the metrics child, a fast drain."""
    probe = settings_of(acl_user())  # only to know the names; the rule is applied below
    rule = acl_rules(probe)["serve"].split()[3:]  # after ACL SETUSER <user>
    rule = [">pw" if part == ">PASSWORD" else part for part in rule]
    environ = acl_user(*rule) | {
        "STREAMD_METRICS_PORT": "0",
        "STREAMD_REAPER_INTERVAL_S": "0.2",
    }
    serve = start_serve(environ=environ)
    serve.wait_ready()
    url, dsn = environ["STREAMD_REDIS_URL"], environ["STREAMD_POSTGRES_DSN"]
    good = xadd(url, [event("t", {"i": i}) for i in range(300)])
    xadd(url, [{"type": "t", "data": "{oops"}])
    wait_until(lambda: count_rows(dsn) == len(good), timeout=20)
    wait_until(lambda: count_rows(dsn, "dead_letter_queue") == 1, timeout=10)
    wait_until(lambda: pending_count(url) == 0, timeout=10)
    time.sleep(0.5)  # a few reaper rounds
    assert serve.terminate() == 0
    assert not serve.events("redis_permission_missing")
    assert not serve.events("redis_permission_denied")
    assert not serve.events("reaper_retrying")


# --- revoked while running -----------------------------------------------------------------


def revoke(redis_server: RedisServer, user: str, *rules: str) -> None:
    with redis.Redis(port=redis_server.port) as r:
        r.execute_command("ACL", "SETUSER", user, *rules)


@pytest.mark.parametrize(
    ("revoked", "named", "bad_entry"),
    [
        ("xack", "xack", False),
        ("xinfo", "xinfo|groups", False),  # the reaper's
        ("evalsha", "evalsha", True),  # the dead-letter script itself
        ("xadd", "xadd", True),  # a command inside it
    ],
)
def test_a_permission_revoked_while_running_is_an_error_line_and_heals(
    revoked: str,
    named: str,
    bad_entry: bool,
    env: dict[str, str],
    acl_user: User,
    redis_server: RedisServer,
    start_serve: Callable[..., ServeProcess],
) -> None:
    """No crash, no hang, no restart: an error line that names the command, at each retry; once
    the permission is back, every event lands exactly once (and the dead letter too). The
    events are produced as another user."""
    environ = acl_user(*ALL) | {
        "STREAMD_RETRY_MAX_S": "0.5",
        "STREAMD_REAPER_INTERVAL_S": "0.3",
        "STREAMD_HEARTBEAT_TIMEOUT_S": "3",
    }
    user = urlsplit(environ["STREAMD_REDIS_URL"]).username or ""
    url, dsn = env["STREAMD_REDIS_URL"], environ["STREAMD_POSTGRES_DSN"]
    serve = start_serve(environ=environ)
    serve.wait_ready()
    revoke(redis_server, user, f"-{revoked}")
    good = xadd(url, [event("t", {"i": i}) for i in range(100)])
    if bad_entry:
        xadd(url, [{"type": "t", "data": "{oops"}])
    denied = wait_until(lambda: serve.events("redis_permission_denied"), timeout=20)
    assert denied[0]["command"] == named and denied[0]["level"] == "error", denied[0]
    time.sleep(4)  # longer than heartbeat_timeout_s: a stopped heartbeat would show now
    revoke(redis_server, user, f"+{revoked}")
    wait_until(lambda: count_rows(dsn) == len(good), timeout=20)
    wait_until(lambda: count_rows(dsn, "dead_letter_queue") == int(bad_entry), timeout=20)
    wait_until(lambda: pending_count(url) == 0, timeout=20, message=serve.tail(10))
    assert not serve.events("child_exited") and not serve.events("child_hung"), serve.tail(20)
    assert "Traceback" not in serve.output()
    assert serve.terminate() == 0


def test_sigterm_while_an_ack_is_refused_stops_within_the_graceful_timeout(
    acl_user: User, redis_server: RedisServer, start_serve: Callable[..., ServeProcess]
) -> None:
    """A drain cannot acknowledge without XACK: after graceful_timeout_s the worker gives up (or
    the supervisor ends it), the entries stay pending (reclaimed later): no hang."""
    environ = acl_user(*ALL) | {"STREAMD_GRACEFUL_TIMEOUT_S": "2", "STREAMD_RETRY_MAX_S": "0.3"}
    user = urlsplit(environ["STREAMD_REDIS_URL"]).username or ""
    serve = start_serve(environ=environ)
    serve.wait_ready()
    revoke(redis_server, user, "-xack")
    xadd(environ["STREAMD_REDIS_URL"], [event("t", {"i": 1})])
    wait_until(lambda: serve.events("redis_permission_denied"), timeout=20)
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(20) == 0
    assert serve.events("worker_drain_incomplete") or serve.events("child_killed")
    assert pending_count(environ["STREAMD_REDIS_URL"]) == 1


# --- the other commands' minimal ACLs ------------------------------------------------------


def with_rule(acl_user: User, family: str) -> dict[str, str]:
    """A user with exactly the documented rule of `family` (for this test's names)."""
    names = settings_of(acl_user())
    rule = acl_rules(names)[family].split()[3:]
    return acl_user(*[">pw" if part == ">PASSWORD" else part for part in rule])


def test_produce_and_monitor_with_their_minimal_acls(acl_user: User) -> None:
    produce = run_streamd(with_rule(acl_user, "produce"), "produce", "300")
    assert produce.returncode == 0, explain(produce)
    monitor = run_streamd(with_rule(acl_user, "monitor"), "monitor", "--once", "--json")
    assert monitor.returncode == 0, explain(monitor)
    frame = orjson.loads(monitor.stdout.splitlines()[0])
    assert (frame["stream_length"], frame["dlq_length"]) == (300, 0), frame


def test_dlq_with_its_minimal_acl(
    env: dict[str, str], acl_user: User, start_serve: Callable[..., ServeProcess]
) -> None:
    serve = start_serve()
    serve.wait_ready()
    xadd(env["STREAMD_REDIS_URL"], [{"type": "t", "data": "{oops"}, {"data": "{}"}])
    wait_until(lambda: count_rows(env["STREAMD_POSTGRES_DSN"], "dead_letter_queue") == 2)
    assert serve.terminate() == 0
    environ = with_rule(acl_user, "dlq")
    listing = run_streamd(environ, "dlq", "list")
    assert listing.returncode == 0 and "2 in table" in listing.stdout, explain(listing)
    replay = run_streamd(environ, "dlq", "replay", "--id", "1", "--yes")
    assert replay.returncode == 0, explain(replay)
    purge = run_streamd(environ, "dlq", "purge", "--yes")
    assert purge.returncode == 0, explain(purge)
    again = run_streamd(environ, "dlq", "list")
    assert "0 in table" in again.stdout and "0 in stream" in again.stdout, explain(again)
