"""The Redis ACL declarations: what each script calls, a harmless probe for every command any
family needs, the rules the docs show, and the wording of refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.exceptions

from streamd.backends.faults import permission_denied
from streamd.backends.redis_acl import Need, Refusal, describe_refusals, grant, probe_args
from streamd.backends.scripts import ScriptPermissionError
from streamd.cli.acl_rules import FAMILIES, acl_rules
from streamd.client.producer import XADD_MANY, producer_needs
from streamd.config import Settings
from streamd.observability.redis_stats import monitor_needs
from streamd.pipeline.dead_letters import ACK_AND_DEAD_LETTER
from streamd.tools.dlq_admin import REPLAY, dlq_needs
from streamd.worker.reaper import DELETE_IF_IDLE
from streamd.worker.redis_needs import serve_needs

ROOT = Path(__file__).resolve().parents[2]


def test_each_script_declares_what_it_calls_on_which_key() -> None:
    assert ACK_AND_DEAD_LETTER.commands == (("xack", 0), ("xadd", 1))
    assert DELETE_IF_IDLE.commands == (("xpending", 0), ("xgroup|delconsumer", 0))
    assert XADD_MANY.commands == (("xadd", 0),)
    assert REPLAY.commands == (("hget", 2), ("xdel", 1), ("xadd", 0), ("hset", 2))


@pytest.mark.parametrize("needs", [serve_needs, producer_needs, monitor_needs, dlq_needs])
@pytest.mark.parametrize(
    "settings",
    [Settings(), Settings(redis_url="redis://u:p@h/3", trim=False, metrics_port=0, max_backlog=0)],
    ids=["defaults", "other"],
)
def test_every_need_has_a_harmless_probe(needs: object, settings: Settings) -> None:
    for need in needs(settings):  # type: ignore[operator]
        args = probe_args(need)
        if need.key is not None and need.command not in ("select", "evalsha"):
            assert need.key in args, (need, args)


def test_the_docs_show_the_rules_for_the_default_names() -> None:
    page = (ROOT / "docs" / "production.md").read_text()
    rules = acl_rules(Settings())
    assert list(rules) == list(FAMILIES)
    for family, rule in rules.items():
        assert f"# {family}\n{rule}\n" in page, f"docs/production.md: the {family} rule is stale"


def test_a_database_other_than_0_needs_select_and_the_rule_names_the_urls_user() -> None:
    rule = acl_rules(Settings(redis_url="redis://ingest:secret@h:6379/4"))["serve"]
    assert rule.startswith(
        "ACL SETUSER ingest on >PASSWORD resetkeys ~events ~events:dead "
        "~streamd:live:streamd:* -@all"
    )
    assert "+select" in rule and "secret" not in rule


def test_refusals_are_worded_with_commands_and_keys() -> None:
    refusals = [
        Refusal(Need("xinfo|groups", "events"), "no permissions to run the 'xinfo|groups' command"),
        Refusal(Need("xadd", "events:dead"), "no permissions to access the 'events:dead' key"),
    ]
    assert describe_refusals(refusals) == "run XINFO GROUPS or access the key 'events:dead'"
    assert grant("app", refusals) == "ACL SETUSER app ~events:dead +xinfo|groups"


@pytest.mark.parametrize("line", [6, 7, 10])  # XADD's first line, a continuation, the other
def test_a_refusal_inside_a_script_names_the_command_of_its_line(line: int) -> None:
    reply = redis.exceptions.ResponseError(
        "The user executing the script can't run this command or subcommand script: "
        f"{ACK_AND_DEAD_LETTER.sha}, on @user_script:{line}."
    )
    error = ACK_AND_DEAD_LETTER.permission_error(reply)
    assert isinstance(error, ScriptPermissionError) and error.command == "xadd"
    assert str(error).startswith("script ack_and_dead_letter, its call of XADD: The user")
    assert permission_denied(error) == {"command": "xadd", "acl": "+xadd"}
    other = redis.exceptions.ResponseError("ERR something else")
    assert ACK_AND_DEAD_LETTER.permission_error(other) is None
