"""`streamd serve`: log the effective settings, then supervise the worker processes until told to
stop. Even `--procs 1` runs under the supervisor (one child), so behaviour is the same at any size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from streamd.common.instances import new_instance_id
from streamd.config.settings import Settings
from streamd.observability.log import get_logger
from streamd.supervisor.arbiter import Supervisor


def serve(settings: Settings, *, reload: Callable[[], Settings] | None = None) -> int:
    """Run until stopped and return the exit code; `reload` re-reads the config (on SIGHUP).

    A failure that stops the service (boot error, crash loop) is raised as a StreamdError.
    """
    log = get_logger()
    # One instance id for the serve's whole life, reloads included (common/instances.py).
    instance_id = settings.instance_id or new_instance_id()
    settings = dataclasses.replace(settings, instance_id=instance_id)

    def reload_keeping_id() -> Settings:
        assert reload is not None
        fresh = reload()
        return dataclasses.replace(fresh, instance_id=fresh.instance_id or instance_id)

    log.info("streamd_starting", **settings.masked())
    code = Supervisor(settings, reload=reload_keeping_id if reload is not None else None).run()
    log.info("streamd_stopped", code=code)
    return code
