"""`./run.sh psql` and `./run.sh redis-cli`: the command-line clients, pointed at the Redis and
Postgres streamd is configured for (the dev servers after `./run.sh dev up`).

Passwords go to the client through its environment (PGPASSWORD, REDISCLI_AUTH), never on its
command line, where `ps` would show them.

    python -m streamd.tools.clients psql|redis-cli [ARGS...]
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

from streamd.config import Settings, load_settings
from streamd.dev.binaries import _pg_bindir_candidates
from streamd.errors import StreamdError

CLIENT_HINT = "install it with: apt-get install postgresql-client redis-tools"


class ClientNotFound(StreamdError):
    """The client program is not installed."""


def _find(name: str, extra: list[Path]) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in extra if p.is_file() and os.access(p, os.X_OK)), None
    )
    if found is None:
        raise ClientNotFound(f"{name} not found on PATH; {CLIENT_HINT}")
    return found


def psql_command(settings: Settings, args: list[str]) -> tuple[list[str], dict[str, str]]:
    psql = _find("psql", [d / "psql" for d in _pg_bindir_candidates()])
    env = {"PGPASSWORD": settings.postgres_password} if settings.postgres_password else {}
    return [psql, settings.postgres_dsn, *args], env


def redis_cli_command(settings: Settings, args: list[str]) -> tuple[list[str], dict[str, str]]:
    cli = _find("redis-cli", [Path("/usr/bin/redis-cli"), Path("/usr/local/bin/redis-cli")])
    url = urlsplit(settings.redis_url)
    database = url.path.strip("/") or "0"
    if url.scheme == "unix":
        target = ["-s", url.path]
        database = dict(p.split("=", 1) for p in url.query.split("&") if "=" in p).get("db", "0")
    else:
        target = ["-h", url.hostname or "127.0.0.1", "-p", str(url.port or 6379)]
    if url.username:
        target += ["--user", unquote(url.username)]
    if url.scheme == "rediss":
        target.append("--tls")
        for flag, path in (
            ("--cacert", settings.redis_ca_file),
            ("--cert", settings.redis_cert_file),
            ("--key", settings.redis_key_file),
        ):
            if path:
                target += [flag, path]
    password = settings.redis_password or unquote(url.password or "")
    env = {"REDISCLI_AUTH": password} if password else {}
    return [cli, *target, "-n", database, *args], env


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("psql", "redis-cli"):
        print("usage: python -m streamd.tools.clients psql|redis-cli [ARGS...]", file=sys.stderr)
        return 2
    try:
        settings = load_settings()[0]
        make = psql_command if argv[0] == "psql" else redis_cli_command
        command, env = make(settings, argv[1:])
    except StreamdError as exc:
        print(f"streamd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    os.execve(command[0], command, {**os.environ, **env})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
