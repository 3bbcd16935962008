"""PostgreSQL specifics: initdb, the OS user it runs as, and reaching it."""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import stat
import struct
import subprocess
from pathlib import Path
from typing import Any

from streamd.dev.binaries import postgres_bindir
from streamd.dev.common import PG_USER_NAME, DevServerError

# PostgreSQL specifics


def postgres_ping(
    port: int, host: str = "127.0.0.1", timeout_s: float = 2.0, database: str = "postgres"
) -> bool:
    """True once the server accepts a session (as pg_isready does): a startup packet answered by
    authentication and ReadyForQuery, not by 'the database system is starting up'."""
    body = b"user\0postgres\0database\0" + database.encode() + b"\0\0"
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack("!ii", 8 + len(body), 196608) + body)
            reader = sock.makefile("rb")
            while True:
                header = reader.read(5)
                if len(header) < 5:
                    return False
                kind, length = header[:1], struct.unpack("!i", header[1:])[0]
                reader.read(length - 4)
                if kind == b"Z":
                    sock.sendall(b"X\0\0\0\4")  # Terminate
                    return True
                if kind == b"E":
                    return False
    except OSError:
        return False


def postgres_os_user() -> pwd.struct_passwd | None:
    """The unprivileged user PostgreSQL runs as when we are root (it refuses to run as root):
    `postgres` if it exists, else a system user `streamd-dev` that we create."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", PG_USER_NAME):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    with contextlib.suppress(OSError):
        # Parallel test workers may race here: whoever loses sees "already exists", which is fine.
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PG_USER_NAME,
            ],
            capture_output=True,
            check=False,
        )
    try:
        return pwd.getpwnam(PG_USER_NAME)
    except KeyError:
        raise DevServerError(
            "PostgreSQL refuses to run as root and there is no unprivileged user to run it as; "
            f"create one: useradd --system {PG_USER_NAME}"
        ) from None


def grant_traverse(path: Path, user: pwd.struct_passwd) -> None:
    """Let `user` reach `path`: add the execute (search) bit for others on every parent that
    stops it. This does not let anyone list or read those directories."""
    for parent in [*reversed(path.absolute().parents), path.absolute()]:
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            continue
        # The group bits, not the others bits, decide for members of the directory's group.
        bit = stat.S_IXGRP if st.st_gid == user.pw_gid else stat.S_IXOTH
        if not st.st_mode & bit:
            os.chmod(parent, stat.S_IMODE(st.st_mode) | bit)


def initdb(data_dir: Path, *, bindir: Path | None = None, sync: bool = True) -> Path:
    """Create a PostgreSQL cluster in data_dir (superuser `postgres`, trust auth, UTF-8)."""
    bindir = bindir or postgres_bindir()
    owner = postgres_os_user()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if owner is not None:
        os.chown(data_dir, owner.pw_uid, owner.pw_gid)
        grant_traverse(data_dir.parent, owner)
    cmd = [str(bindir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust"]
    cmd += ["--encoding=UTF8", "--locale=C", *([] if sync else ["--no-sync"])]
    try:
        out = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            check=False,
            cwd=str(data_dir),
            **run_as(owner),
        )
    except OSError as exc:  # not executable by the user it runs as (root: the postgres user)
        who = f" as {owner.pw_name}" if owner is not None else ""
        raise DevServerError(f"cannot run {cmd[0]}{who}: {exc.strerror or exc}") from None
    if out.returncode != 0:
        tail = " | ".join((out.stdout + out.stderr).strip().splitlines()[-6:])
        raise DevServerError(f"initdb into {data_dir} failed (exit {out.returncode}): {tail}")
    return data_dir


def run_as(user: pwd.struct_passwd | None) -> dict[str, Any]:
    if user is None:
        return {}
    env = {**os.environ, "HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": [], "env": env}


def copy_tree(src: Path, dst: Path) -> None:
    # cp -a keeps owners and modes, which PostgreSQL checks on its data directory.
    out = subprocess.run(["cp", "-a", str(src), str(dst)], capture_output=True, text=True)
    if out.returncode != 0:
        raise DevServerError(f"cannot copy {src} to {dst}: {out.stderr.strip()}")


def quoted_path(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------------------------------
