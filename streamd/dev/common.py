"""Where the dev servers live and the one error they raise."""

from __future__ import annotations

from pathlib import Path

from streamd.errors import StreamdError

DEV_ROOT = Path(".streamd/dev")
DEV_REDIS_PORT = 16379
DEV_POSTGRES_PORT = 15432
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
INSTALL_HINT = "install it with: apt-get install redis-server postgresql"
PG_USER_NAME = "streamd-dev"  # created when PostgreSQL must not run as root and no postgres user


class DevServerError(StreamdError):
    """A private server cannot be found, started or stopped; the message says what to do."""
