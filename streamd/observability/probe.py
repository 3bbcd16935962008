"""`streamd health`: ask a running serve's /healthz or /readyz, for container health checks
(the Dockerfile's HEALTHCHECK), exec probes and scripts.

The address is the serve's own metrics_host and metrics_port, read from the same settings, so the
check follows the config. A wildcard listen address (0.0.0.0, ::) is asked on loopback.
"""

from __future__ import annotations

import urllib.error
import urllib.request

from streamd.config.settings import Settings
from streamd.errors import ConfigError

TIMEOUT_S = 5.0  # /readyz itself gives Redis and Postgres 2 s each
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def probe_url(settings: Settings, ready: bool) -> str:
    if settings.metrics_port == 0:
        raise ConfigError("metrics_port is 0: serve has no /healthz or /readyz to ask")
    host = _WILDCARDS.get(settings.metrics_host, settings.metrics_host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.metrics_port}/{'readyz' if ready else 'healthz'}"


def probe(settings: Settings, ready: bool = False) -> tuple[bool, str]:
    """(healthy, one line saying what the endpoint answered or why it could not be asked)."""
    url = probe_url(settings, ready)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            return True, f"{url}: {resp.read().decode(errors='replace').strip()}"
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace").strip()
        return False, f"{url}: {exc.code} {body}"
    except (OSError, urllib.error.URLError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"{url}: no answer ({reason}); is streamd serve running with metrics on?"
