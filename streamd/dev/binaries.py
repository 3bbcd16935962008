"""Finding redis-server and the PostgreSQL binaries, with an install hint when they are missing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from streamd.dev.common import INSTALL_HINT, DevServerError

# ---------------------------------------------------------------------------------------------
# binaries


def redis_server_binary() -> Path:
    """redis-server: $STREAMD_REDIS_SERVER, else PATH, else the usual install locations."""
    override = os.environ.get("STREAMD_REDIS_SERVER")
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise DevServerError(
                f"redis-server not found at {override} (STREAMD_REDIS_SERVER); {INSTALL_HINT}"
            )
        return path
    found = shutil.which("redis-server") or _first_executable(
        [Path("/usr/bin/redis-server"), Path("/usr/local/bin/redis-server")]
    )
    if found is None:
        raise DevServerError(
            "redis-server not found on PATH (or set STREAMD_REDIS_SERVER); " + INSTALL_HINT
        )
    return Path(found)


def postgres_bindir() -> Path:
    """The directory holding initdb and postgres: $STREAMD_PG_BIN, else PATH, else the highest
    version under /usr/lib/postgresql/*/bin (Debian keeps them off PATH)."""
    override = os.environ.get("STREAMD_PG_BIN")
    if override:
        missing = _missing_pg_tools(Path(override))
        if missing:
            raise DevServerError(
                f"{' and '.join(missing)} not found in {override} (STREAMD_PG_BIN); " + INSTALL_HINT
            )
        return Path(override)
    for candidate in _pg_bindir_candidates():
        if not _missing_pg_tools(candidate):
            return candidate
    raise DevServerError(
        "PostgreSQL server binaries (initdb, postgres) not found on PATH or in "
        "/usr/lib/postgresql/*/bin (or set STREAMD_PG_BIN); " + INSTALL_HINT
    )


def _first_executable(paths: list[Path]) -> str | None:
    return next((str(p) for p in paths if p.is_file() and os.access(p, os.X_OK)), None)


def _missing_pg_tools(bindir: Path) -> list[str]:
    return [t for t in ("initdb", "postgres") if not os.access(bindir / t, os.X_OK)]


def _pg_bindir_candidates() -> Iterator[Path]:
    found = shutil.which("initdb")
    if found:
        yield Path(found).resolve().parent  # /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin
        yield Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    yield from versions
    yield Path("/usr/local/pgsql/bin")


def _version_key(bindir: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", bindir.parent.name))


@lru_cache(maxsize=8)
def has_pg_stat_statements(bindir: Path) -> bool:
    """Whether the server in `bindir` can preload pg_stat_statements (Debian ships it)."""
    real = (bindir / "postgres").resolve().parent
    libdirs = [real.parent / "lib"]
    pg_config = real / "pg_config"
    if os.access(pg_config, os.X_OK):
        out = subprocess.run(
            [str(pg_config), "--pkglibdir"], capture_output=True, text=True, check=False
        )
        if out.returncode == 0 and out.stdout.strip():
            libdirs.insert(0, Path(out.stdout.strip()))
    return any((d / "pg_stat_statements.so").is_file() for d in libdirs)


# ---------------------------------------------------------------------------------------------
