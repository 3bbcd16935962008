#!/usr/bin/env python3
"""The image's entrypoint: `streamd ARGS`, with signals passed on and its exit code kept, except
that `serve`'s exits 2 (bad config) and 78 (a start-up error a restart cannot fix: credentials,
a missing database or privilege) become 0.

Docker's restart policies cannot skip exit codes. With `restart: on-failure` (docker-compose.yml)
this makes Docker do what systemd's RestartPreventExitStatus=2 78 does: restart after a crash loop
(70) or an outage at start (69), but not loop forever on a mistake that only a person can fix.
The log keeps the original code and the error line.

streamd runs in a session of its own, so Ctrl-C on `docker run -it` reaches it once, through
this process (a second SIGINT means "stop at once" to streamd). Run the container with an init
(`init: true`, `docker run --init`) so that something reaps orphans: this process reaps only its
own child.
"""

from __future__ import annotations

import signal
import subprocess
import sys

PERMANENT = {2: "bad flag or config value", 78: "a start-up error a restart cannot fix"}
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def command_of(args: list[str]) -> str | None:
    """The streamd command in args, past the global options (`--config FILE serve`)."""
    words = iter(args)
    for word in words:
        if word in ("--config", "--set"):
            next(words, None)  # its value
        elif not word.startswith("-"):
            return word
    return None


def main(argv: list[str]) -> int:
    args = argv or ["serve"]
    try:
        child = subprocess.Popen(["streamd", *args], start_new_session=True)
    except OSError as exc:
        print(f"streamd-entrypoint: cannot run streamd: {exc}", file=sys.stderr, flush=True)
        return 127
    for signum in FORWARDED:
        signal.signal(signum, lambda sig, _frame: child.send_signal(sig))
    code = child.wait()  # a signal handler runs in between; wait() resumes (PEP 475)
    if code < 0:  # killed by a signal: report it the way a shell does
        return 128 - code
    if command_of(args) == "serve" and code in PERMANENT:
        print(
            f"streamd-entrypoint: streamd serve exited {code} ({PERMANENT[code]}); exiting 0 so "
            "that `restart: on-failure` does not restart it: fix the cause, then start it again",
            file=sys.stderr,
            flush=True,
        )
        return 0
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
