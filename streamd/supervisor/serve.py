"""`streamd serve`: log the effective settings, then supervise the worker processes until told to
stop. Even `--procs 1` runs under the supervisor (one child), so behaviour is the same at any size.
"""

from __future__ import annotations

from collections.abc import Callable

from streamd.config.settings import Settings
from streamd.observability.log import get_logger
from streamd.supervisor.arbiter import Supervisor


def serve(settings: Settings, *, reload: Callable[[], Settings] | None = None) -> int:
    """Run until stopped and return the exit code; `reload` re-reads the config (on SIGHUP).

    A failure that stops the service (boot error, crash loop) is raised as a StreamdError.
    """
    log = get_logger()
    log.info("streamd_starting", **settings.masked())
    code = Supervisor(settings, reload=reload).run()
    log.info("streamd_stopped", code=code)
    return code
