"""Exceptions that end a command with one clear line, and the exit codes they map to.

The codes follow sysexits(3) where one fits, so systemd units and shell scripts can tell a mistake
that a restart cannot fix (config, credentials) from an outage that may heal by itself.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # bad flag or config value: click uses 2 for usage errors too
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: Redis or Postgres unreachable at start
EXIT_CRASH_LOOP = 70  # EX_SOFTWARE: children kept crashing; the supervisor gave up
EXIT_BOOT = 78  # EX_CONFIG: a boot error that retrying cannot heal (credentials, permissions)


class StreamdError(Exception):
    """An error meant for the user: printed as one line, never as a traceback."""

    exit_code = EXIT_FAILURE


class ConfigError(StreamdError):
    """An invalid config key or value; the message names the key and where the value came from."""

    exit_code = EXIT_USAGE


class ServiceUnavailable(StreamdError):
    """Redis or Postgres cannot be reached at start (it may come back: a restart can help)."""

    exit_code = EXIT_UNAVAILABLE


class BootError(StreamdError):
    """Startup failed for a reason a restart cannot fix: bad credentials, missing privileges."""

    exit_code = EXIT_BOOT
