#!/usr/bin/env bash
# streamd's one entry point for people and CI: ./run.sh help
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
STATE_DIR=${RUN_SH_STATE_DIR:-.streamd} # another place: for the tests of run.sh itself
DEV_ENV=$STATE_DIR/dev/env
SERVE_PID=$STATE_DIR/serve.pid
SERVE_LOG=$STATE_DIR/serve.log
VENV=${UV_PROJECT_ENVIRONMENT:-.venv}
DEMO_EVENTS=5000

usage() {
    cat <<'EOF'
Usage: ./run.sh VERB [ARGS]

  demo [--keep]        try it: private Redis + Postgres (unless configured), serve, 5000 sample
                       events, counts per type; --keep leaves serve running (./run.sh stop)
  test [PYTEST ARGS]   the whole suite (pytest -n auto), then ruff, mypy and the docs build;
                       installs redis-server, postgresql and prometheus first if missing and
                       run as root
  start [-d] [ARGS]    streamd serve ARGS (-d: in the background, log in .streamd/serve.log)
  stop                 stop a serve started by start -d or demo --keep (SIGTERM, waits)
  produce N [ARGS]     streamd produce N: sample events of five types
  monitor [S] [ARGS]   streamd monitor --interval S (default 5)
  benchmark R D [ARGS] streamd bench --rate R --duration D
  dev up|down|status   private Redis and Postgres under .streamd/dev (streamd dev ...)
  env                  shell lines for another terminal: eval "$(./run.sh env)" puts streamd
                       on PATH and points it at the same Redis and Postgres as run.sh
  psql [ARGS]          psql on streamd's Postgres (the dev server after dev up)
  redis-cli [ARGS]     redis-cli on streamd's Redis (the dev server after dev up)
  clean                stop serve and the dev servers, delete .streamd/
  help                 this text

Settings come from STREAMD_* variables, or the compatible names (REDIS_HOST, POSTGRES_*, ...) in
./.env, which is read when present. With neither set, start/produce/monitor/benchmark/env/psql/
redis-cli use the dev servers once `./run.sh dev up` has run.
EOF
}

say() { printf '==> %s\n' "$*" >&2; }
die() {
    printf 'run.sh: error: %s\n' "$*" >&2
    exit 1
}

# --- environment ------------------------------------------------------------------------------

ensure_uv() {
    export PATH="$HOME/.local/bin:$PATH"
    command -v uv >/dev/null 2>&1 && return
    if ! python3 -m pip --version >/dev/null 2>&1; then
        if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
            die "uv is missing and so is pip: install python3-pip, or uv (https://docs.astral.sh/uv/)"
        fi
        say "installing python3-pip (to install uv)"
        apt_install python3-pip
    fi
    say "installing uv with pip"
    # Debian's Python is "externally managed": a --user install then needs the override.
    python3 -m pip install --user --quiet uv 2>/dev/null ||
        python3 -m pip install --user --quiet --break-system-packages uv ||
        die "could not install uv with pip"
    command -v uv >/dev/null 2>&1 || die "uv was installed but is not on PATH (~/.local/bin)"
}

ensure_project() {
    ensure_uv
    export STREAMD_INVOKED_AS=./run.sh # streamd's hints then name ./run.sh commands
    uv sync --frozen --quiet || die "uv sync --frozen failed (is uv.lock up to date?)"
    if [[ -f .env ]]; then
        set -a
        # shellcheck disable=SC1091
        . ./.env
        set +a
    fi
}

apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null || die "apt-get install $* failed"
}

have_pg_binaries() {
    [[ -n ${STREAMD_PG_BIN:-} ]] && return 0
    command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1 && return 0
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

have_prometheus_binaries() {
    local dir=${STREAMD_PROMETHEUS_BIN:-}
    if [[ -n $dir ]]; then
        [[ -x $dir/prometheus && -x $dir/promtool ]]
        return
    fi
    command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1
}

have_pgbouncer() {
    [[ -n ${STREAMD_PGBOUNCER:-} ]] || command -v pgbouncer >/dev/null 2>&1 || [[ -x /usr/sbin/pgbouncer ]]
}

# Tests and the dev servers run their own redis-server and postgres; the tests of the alert rules
# their own prometheus (and promtool) with --with-prometheus, and those of postgres_pooler their
# own pgbouncer with --with-pgbouncer: install what is missing.
ensure_server_binaries() {
    local missing=() flag
    [[ -n ${STREAMD_REDIS_SERVER:-} ]] || command -v redis-server >/dev/null 2>&1 ||
        missing+=(redis-server)
    have_pg_binaries || missing+=(postgresql)
    for flag in "$@"; do
        case $flag in
        --with-prometheus) have_prometheus_binaries || missing+=(prometheus) ;;
        --with-pgbouncer) have_pgbouncer || missing+=(pgbouncer) ;;
        esac
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        die "missing: ${missing[*]}; install with: sudo apt-get install ${missing[*]}"
    fi
    say "installing ${missing[*]} (apt-get)"
    apt_install "${missing[@]}"
}

streamd() { "$VENV/bin/streamd" "$@"; }

configured() {
    [[ -n ${STREAMD_REDIS_URL:-}${STREAMD_POSTGRES_DSN:-}${REDIS_HOST:-}${POSTGRES_HOST:-} ]]
}

# With nothing configured, use the dev servers if `dev up` has run.
use_dev_servers_if_unconfigured() {
    if ! configured && [[ -f $DEV_ENV ]]; then
        # shellcheck disable=SC1090
        . "$DEV_ENV"
    fi
}

# --- serve in the background ------------------------------------------------------------------

serve_pid() {
    local pid
    [[ -f $SERVE_PID ]] || return 1
    pid=$(<"$SERVE_PID")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

start_background() {
    local pid
    if pid=$(serve_pid); then
        say "streamd serve already running (pid $pid)"
        return
    fi
    mkdir -p "$STATE_DIR"
    : >"$SERVE_LOG"
    nohup "$VENV/bin/streamd" serve "$@" >>"$SERVE_LOG" 2>&1 </dev/null &
    echo $! >"$SERVE_PID"
    say "streamd serve started (pid $!), log in $SERVE_LOG"
}

wait_serve_ready() {
    local pid deadline=$((SECONDS + 60))
    until grep -q '"worker_started"' "$SERVE_LOG" 2>/dev/null; do
        if ! pid=$(serve_pid); then
            tail -n 20 "$SERVE_LOG" >&2 || true
            die "streamd serve exited (log above, in $SERVE_LOG)"
        fi
        ((SECONDS < deadline)) || die "streamd serve not ready after 60 s; see $SERVE_LOG"
        sleep 0.2
    done
}

stop_serve() {
    local pid deadline=$((SECONDS + 60))
    if ! pid=$(serve_pid); then
        rm -f "$SERVE_PID"
        say "no streamd serve running (from $SERVE_PID)"
        return
    fi
    say "stopping streamd serve (pid $pid)"
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            say "still running after 60 s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        sleep 0.2
    done
    rm -f "$SERVE_PID"
}

# --- verbs ------------------------------------------------------------------------------------

cmd_test() {
    ensure_server_binaries --with-prometheus --with-pgbouncer
    ensure_project
    local rc=0
    uv run --frozen --no-sync pytest -n auto "$@" || rc=$?
    say "ruff check"
    uv run --frozen --no-sync ruff check . || rc=$((rc ? rc : 1))
    say "mypy"
    uv run --frozen --no-sync mypy || rc=$((rc ? rc : 1))
    say "lint-imports (the layering contracts in pyproject.toml)"
    uv run --frozen --no-sync lint-imports --no-cache || rc=$((rc ? rc : 1))
    say "mkdocs build --strict"
    local site # a scratch site: the check must not leave site/ behind
    site=$(mktemp -d)
    # NO_MKDOCS_2_WARNING: Material's banner about its successor, printed on every build
    NO_MKDOCS_2_WARNING=1 uv run --frozen --no-sync mkdocs build --strict --quiet --site-dir "$site" ||
        rc=$((rc ? rc : 1))
    rm -rf "$site"
    return "$rc" # pytest's own code when tests failed; 1 when only lint, types or docs did
}

cmd_demo() {
    local keep=0
    [[ ${1:-} == --keep ]] && keep=1
    ensure_project
    if ! configured; then
        ensure_server_binaries
        say "no Redis/Postgres configured: starting private ones (streamd dev up)"
        streamd dev up --root "$STATE_DIR/dev" >/dev/null
        # shellcheck disable=SC1090
        . "$DEV_ENV"
    fi
    streamd db init
    local before
    before=$(demo_py count)
    start_background
    wait_serve_ready
    streamd produce "$DEMO_EVENTS"
    say "waiting for $DEMO_EVENTS events to reach Postgres"
    demo_py wait $((before + DEMO_EVENTS)) 60
    streamd monitor --once
    if [[ $keep -eq 1 ]]; then
        say "serve keeps running (pid $(serve_pid)), log in $SERVE_LOG; stop it with: ./run.sh stop"
        say "in another terminal, from $PWD:"
        say "  ./run.sh redis-cli XADD events '*' type user_created data '{\"user_id\":1}'"
        say "  ./run.sh psql -c 'SELECT entry_id, event_type, payload FROM events LIMIT 5'"
        say "  eval \"\$(./run.sh env)\"    # then streamd itself: streamd monitor"
    else
        stop_serve
    fi
}

# The demo's look at Redis and Postgres, through streamd's own settings (env, .env, config file).
demo_py() {
    "$VENV/bin/python" - "$@" <<'PY'
import asyncio, sys, time

from streamd.config import load_settings
from streamd.backends.connections import postgres_connect, redis_client
from streamd.backends.sql import quote_ident

s = load_settings()[0]


async def count():
    conn = await postgres_connect(s)
    try:
        return await conn.fetchval(f"SELECT count(*) FROM {quote_ident(s.events_table)}")
    finally:
        await conn.close()


async def pending():
    r = redis_client(s)
    try:
        return (await r.xpending(s.stream, s.group))["pending"]
    finally:
        await r.aclose()


async def wait(target, timeout):
    deadline = time.monotonic() + timeout
    while (n := await count()) < target or await pending():
        if time.monotonic() > deadline:
            sys.exit(f"run.sh: error: {n} of {target} events in Postgres after {timeout} s")
        await asyncio.sleep(0.2)
    print(f"{n} events in Postgres, none pending")


verb, args = sys.argv[1], [int(a) for a in sys.argv[2:]]
jobs = {"count": lambda: count(), "wait": lambda: wait(*args)}
result = asyncio.run(jobs[verb]())
if verb == "count":
    print(result)
PY
}

cmd_start() {
    ensure_project
    use_dev_servers_if_unconfigured
    if [[ ${1:-} == -d || ${1:-} == --background ]]; then
        shift
        start_background "$@"
        wait_serve_ready
        return
    fi
    mkdir -p "$STATE_DIR"
    echo $$ >"$SERVE_PID" # exec keeps the pid: ./run.sh stop finds this serve too
    exec "$VENV/bin/streamd" serve "$@"
}

# For another terminal: the PATH, .env and dev servers that run.sh itself uses.
cmd_env() {
    ensure_project
    printf '# streamd from %s; use it in a shell with: eval "$(./run.sh env)"\n' "$PWD"
    local venv=$VENV
    [[ $venv == /* ]] || venv=$PWD/$venv
    printf 'export PATH=%q:"$PATH"\n' "$venv/bin"
    if [[ -f .env ]]; then
        printf 'set -a; . %q; set +a\n' "$PWD/.env"
    fi
    if ! configured && [[ -f $DEV_ENV ]]; then
        grep '^export ' "$DEV_ENV"
    elif ! configured; then
        say "no Redis/Postgres configured (STREAMD_*, .env) and no dev servers: ./run.sh dev up"
    fi
}

# psql / redis-cli with streamd's own settings (the password through the environment).
cmd_client() {
    ensure_project
    use_dev_servers_if_unconfigured
    exec "$VENV/bin/python" -m streamd.tools.clients "$@"
}

cmd_clean() {
    ensure_project
    stop_serve
    if [[ -d $STATE_DIR/dev ]]; then
        streamd dev down --root "$STATE_DIR/dev"
    fi
    rm -rf "$STATE_DIR"
    say "removed $STATE_DIR/"
}

main() {
    local verb=${1:-help}
    [[ $# -gt 0 ]] && shift
    case $verb in
    help | -h | --help) usage ;;
    test) cmd_test "$@" ;;
    demo) cmd_demo "$@" ;;
    start) cmd_start "$@" ;;
    stop) ensure_project && stop_serve ;;
    clean) cmd_clean ;;
    produce)
        [[ $# -ge 1 ]] || die "usage: ./run.sh produce N"
        ensure_project && use_dev_servers_if_unconfigured && streamd produce "$@"
        ;;
    monitor)
        local interval=${1:-5}
        [[ $# -gt 0 ]] && shift
        ensure_project && use_dev_servers_if_unconfigured
        streamd monitor --interval "$interval" "$@"
        ;;
    benchmark)
        [[ $# -ge 2 ]] || die "usage: ./run.sh benchmark RATE DURATION"
        ensure_project && use_dev_servers_if_unconfigured
        streamd bench --rate "$1" --duration "$2" "${@:3}"
        ;;
    env) cmd_env ;;
    psql | redis-cli) cmd_client "$verb" "$@" ;;
    dev)
        [[ $# -ge 1 ]] || die "usage: ./run.sh dev up|down|status"
        [[ $1 == up ]] && ensure_server_binaries
        ensure_project && streamd dev "$1" --root "$STATE_DIR/dev" "${@:2}"
        ;;
    *)
        usage >&2
        die "unknown verb: $verb"
        ;;
    esac
}

main "$@"
