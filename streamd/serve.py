"""`streamd serve`: log the effective settings, then run the pipeline until told to stop."""

from __future__ import annotations

from collections.abc import Callable

from streamd.config import Settings
from streamd.errors import EXIT_OK
from streamd.log import get_logger
from streamd.worker import run_worker


def serve(settings: Settings, *, reload: Callable[[], Settings] | None = None) -> int:
    """Run until stopped; `reload` re-reads the config (used on SIGHUP)."""
    log = get_logger()
    log.info("streamd_starting", **settings.masked())
    run_worker(settings)
    log.info("streamd_stopped")
    return EXIT_OK
