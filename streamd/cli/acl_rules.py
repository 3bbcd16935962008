"""The minimal Redis ACL of each streamd command family, for the configured names: what
`streamd config --redis-acl` prints and docs/operations.md shows for the defaults."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from streamd.backends.redis_acl import minimal_rule
from streamd.client.producer import producer_needs
from streamd.config.settings import Settings
from streamd.observability.redis_stats import monitor_needs
from streamd.tools.dlq_admin import dlq_needs
from streamd.worker.redis_needs import serve_needs

FAMILIES = ("serve", "produce", "monitor", "dlq")


def acl_rules(settings: Settings) -> dict[str, str]:
    """family -> `ACL SETUSER <user> on >PASSWORD resetkeys ~key... -@all +command...`. The user
    is the one in redis_url, else `streamd` (never `default`: this rule takes everything else
    away from the user it is applied to)."""
    user = unquote(urlsplit(settings.redis_url).username or "") or "streamd"
    needs = {
        "serve": serve_needs(settings),
        "produce": producer_needs(settings),
        "monitor": monitor_needs(settings),
        "dlq": dlq_needs(settings),
    }
    return {family: minimal_rule(user, needs[family]) for family in FAMILIES}
