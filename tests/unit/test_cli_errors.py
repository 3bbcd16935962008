"""Bad config and bad command lines, through the real `streamd` command: one clear message naming
what is wrong, no traceback, exit 2, nothing on stdout, and nothing connected to.

Settings are resolved by one code path for every command, so the matrix of bad values runs through
`streamd config` (the cheapest command) plus `serve`; every command that takes settings is then
checked with a bad value and a bad flag of its own. The services' URLs point at a closed port: a
case that wrongly passed validation would fail there, never touch a real service.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from streamd.dev.processes import free_port
from tests.support.streamd_cli import explain, run_streamd

pytestmark = pytest.mark.timeout(120)

# Every command that resolves settings, with the arguments it needs to get that far.
SETTINGS_COMMANDS = [
    ["serve"],
    ["db", "init"],
    ["config"],
    ["produce", "1"],
    ["monitor", "--once"],
    ["dlq", "list"],
    ["dlq", "replay", "--all", "--yes"],
    ["dlq", "purge", "--yes"],
    ["bench", "--drain", "1"],
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    out = {
        "empty": d / "empty.toml",
        "bad_toml": d / "bad.toml",
        "not_utf8": d / "latin1.toml",
        "unknown_key": d / "unknown.toml",
        "section": d / "section.toml",
        "bad_value": d / "bad-value.toml",
        "dir": d / "a-directory",
        "cert": d / "ca.pem",
    }
    out["empty"].write_text("")
    out["bad_toml"].write_text("batch_size = \n")
    out["not_utf8"].write_bytes(b"stream = '\xe9v\xe9nements'\n")
    out["unknown_key"].write_text("batchsize = 10\n")
    out["section"].write_text("[redis]\nurl = 'redis://127.0.0.1/0'\n")
    out["bad_value"].write_text('batch_size = "many"\n')
    out["dir"].mkdir()
    out["cert"].write_text("not really a certificate, but a file\n")
    return out


@pytest.fixture(scope="module")
def base_env(files: dict[str, Path]) -> Iterator[dict[str, str]]:
    closed = free_port()
    environ = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("STREAMD_", "POSTGRES_", "REDIS_")) and k not in SEED_NAMES
    }
    environ |= {
        "STREAMD_CONFIG": str(files["empty"]),
        "STREAMD_REDIS_URL": f"redis://127.0.0.1:{closed}/0",
        "STREAMD_POSTGRES_DSN": f"postgresql://postgres@127.0.0.1:{closed}/postgres",
        "STREAMD_METRICS_PORT": "0",
        "STREAMD_LOG_FORMAT": "json",
    }
    yield environ


SEED_NAMES = {"NUM_WORKERS", "BATCH_SIZE", "BATCH_TIMEOUT_SECONDS", "XREAD_COUNT", "XREAD_BLOCK_MS"}


def assert_usage_error(result: subprocess.CompletedProcess[str], *texts: str) -> None:
    """Exit 2, no traceback, nothing on stdout, and exactly one error line (streamd's own
    `streamd: error: ...`, or click's `Error: ...` under its usage hint) that says `texts`."""
    assert result.returncode == 2, explain(result)
    assert "Traceback" not in result.stderr, explain(result)
    assert result.stdout == "", explain(result)
    errors = [
        line
        for line in result.stderr.splitlines()
        if line.startswith(("streamd: error:", "Error:"))
    ]
    assert len(errors) == 1, explain(result)
    if errors[0].startswith("streamd: error:"):  # streamd's own: the whole message is one line
        assert result.stderr.strip() == errors[0], explain(result)
    for text in texts:
        assert text in errors[0], explain(result)


# (name, global args, extra environment (None: unset), text the message must hold)
BAD_SETTINGS: list[tuple[str, list[str], dict[str, str | None], list[str]]] = [
    ("not an integer", ["--set", "batch_size=abc"], {}, ["batch_size (flag --set", "integer"]),
    ("below minimum", ["--set", "tasks=0"], {}, ["tasks", ">= 1"]),
    ("above maximum", ["--set", "procs=257"], {}, ["procs", "<= 256"]),
    ("procs word", [], {"STREAMD_PROCS": "many"}, ["procs (env STREAMD_PROCS)"]),
    ("not finite", [], {"STREAMD_BATCH_TIMEOUT_S": "inf"}, ["batch_timeout_s", "finite"]),
    ("not a bool", [], {"STREAMD_TRIM": "perhaps"}, ["trim", "true or false"]),
    ("not a choice", [], {"STREAMD_LOG_LEVEL": "loud"}, ["log_level", "one of"]),
    ("unknown env key", [], {"STREAMD_BACH_SIZE": "1"}, ["STREAMD_BACH_SIZE", "batch_size"]),
    ("unknown --set key", ["--set", "bogus=1"], {}, ["--set", "unknown config key 'bogus'"]),
    ("--set no '='", ["--set", "batch_size"], {}, ["--set", "KEY=VALUE"]),
    ("--set empty key", ["--set", "=5"], {}, ["--set", "KEY=VALUE"]),
    ("seed env", [], {"BATCH_SIZE": "lots"}, ["env BATCH_SIZE", "integer"]),
    (
        "seed port",
        [],
        {"REDIS_PORT": "abc", "STREAMD_REDIS_URL": None},  # a STREAMD_* name would win
        ["REDIS_HOST/REDIS_PORT", "Port"],
    ),
    ("missing file", ["--config", "/nonexistent/streamd.toml"], {}, ["not found"]),
    ("file is a dir", ["--config", "{dir}"], {}, ["not found"]),
    ("env config file", [], {"STREAMD_CONFIG": "{bad_toml}"}, ["invalid TOML", "line 1"]),
    ("bad TOML", ["--config", "{bad_toml}"], {}, ["invalid TOML"]),
    ("not UTF-8", ["--config", "{not_utf8}"], {}, ["cannot read"]),
    ("unknown file key", ["--config", "{unknown_key}"], {}, ["'batchsize'", "'batch_size'"]),
    ("section", ["--config", "{section}"], {}, ["[redis]", "flat"]),
    ("bad file value", ["--config", "{bad_value}"], {}, ["batch_size (config file", "many"]),
    ("redis scheme", [], {"STREAMD_REDIS_URL": "http://127.0.0.1/0"}, ["redis_url", "redis://"]),
    ("redis port", [], {"STREAMD_REDIS_URL": "redis://127.0.0.1:99999/0"}, ["out of range"]),
    ("redis db", [], {"STREAMD_REDIS_URL": "redis://127.0.0.1/zero"}, ["database number"]),
    (
        "redis param",
        [],
        {"STREAMD_REDIS_URL": "redis://127.0.0.1/0?socket_timeout=x"},
        ["'socket_timeout'"],
    ),
    ("redis unix", [], {"STREAMD_REDIS_URL": "unix://"}, ["socket path"]),
    ("ipv6", [], {"STREAMD_REDIS_URL": "redis://[::1/0"}, ["invalid URL"]),
    (
        "pg scheme",
        [],
        {"STREAMD_POSTGRES_DSN": "mysql://u@h/db"},
        ["postgres_dsn", "postgresql://"],
    ),
    (
        "pg sslmode",
        [],
        {"STREAMD_POSTGRES_DSN": "postgresql://u@h/db?sslmode=on"},
        ["sslmode='on'"],
    ),
    (
        "pg root cert",
        [],
        {"STREAMD_POSTGRES_DSN": "postgresql://u@h/db?sslrootcert=/no/ca.pem"},
        ["/no/ca.pem"],
    ),
    (
        "pg port",
        [],
        {"POSTGRES_PORT": "5432x", "STREAMD_POSTGRES_DSN": None},
        ["POSTGRES_HOST/PORT/DB/USER"],
    ),
    ("CA with redis://", [], {"STREAMD_REDIS_CA_FILE": "{cert}"}, ["redis_ca_file", "rediss://"]),
    ("missing CA", [], {"STREAMD_REDIS_CA_FILE": "/no/ca.pem"}, ["/no/ca.pem not found"]),
    ("password file", [], {"STREAMD_POSTGRES_PASSWORD_FILE": "/no/pw"}, ["postgres_password_file"]),
    ("password dir", [], {"STREAMD_REDIS_PASSWORD_FILE": "{dir}"}, ["Is a directory"]),
    ("table injection", ["--set", "events_table=events; DROP TABLE x"], {}, ["not a valid table"]),
    ("quoted table", [], {"STREAMD_DLQ_TABLE": 'x" OR "1'}, ["dlq_table", "not a valid table"]),
    ("schema.table", [], {"STREAMD_EVENTS_TABLE": "pg_catalog.pg_class"}, ["not a valid table"]),
    ("non-ASCII table", [], {"STREAMD_EVENTS_TABLE": "événements"}, ["not a valid table"]),
    ("long table", [], {"STREAMD_EVENTS_TABLE": "t" * 49}, ["at most 48"]),
    ("stream space", ["--set", "stream=a b"], {}, ["stream", "not a valid Redis key"]),
    ("stream newline", ["--set", "stream=a\nb"], {}, ["'a\\nb'"]),
    ("group glob", [], {"STREAMD_GROUP": "*"}, ["group", "not a valid Redis key"]),
    ("same dlq", [], {"STREAMD_DLQ_STREAM": "events"}, ["must differ from stream"]),
    ("empty stream", ["--set", "stream="], {}, ["stream (flag --set", "must not be empty"]),
    ("empty stream env", [], {"STREAMD_STREAM": ""}, ["stream (env", "must not be empty"]),
    ("stream no letter", [], {"STREAMD_STREAM": "-"}, ["'-'", "a letter or a digit"]),
    ("dead stream", [], {"STREAMD_STREAM": "events:dead"}, ["stream", "dead-letter streams"]),
    ("empty group", ["--set", "group="], {}, ["group (flag --set", "must not be empty"]),
    ("pooler", [], {"STREAMD_POSTGRES_POOLER": "pgcat"}, ["postgres_pooler", "one of auto"]),
    ("retry bounds", [], {"STREAMD_RETRY_MAX_S": "0.001"}, [">= retry_initial_s"]),
    ("metrics host", [], {"STREAMD_METRICS_HOST": ""}, ["metrics_host", "empty"]),
    ("unknown command", ["bogus"], {}, ["No such command 'bogus'"]),
]


def _fill(text: str, files: dict[str, Path]) -> str:
    return text.format(**{k: str(v) for k, v in files.items()}) if "{" in text else text


@pytest.mark.parametrize(
    ("global_args", "extra", "texts"),
    [pytest.param(a, e, t, id=name) for name, a, e, t in BAD_SETTINGS],
)
def test_bad_setting_is_one_line_and_exit_2(
    global_args: list[str],
    extra: dict[str, str | None],
    texts: list[str],
    base_env: dict[str, str],
    files: dict[str, Path],
) -> None:
    environ = {**base_env, **{k: _fill(v, files) for k, v in extra.items() if v is not None}}
    for key in [k for k, v in extra.items() if v is None]:
        del environ[key]
    args = [_fill(a, files) for a in global_args]
    command = [] if args == ["bogus"] else ["config"]
    assert_usage_error(run_streamd(environ, *args, *command), *texts)


def _runs(
    base_env: dict[str, str], argvs: list[list[str]]
) -> list[subprocess.CompletedProcess[str]]:
    """Several short runs side by side (each is mostly Python start-up)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda argv: run_streamd(base_env, *argv), argvs))


@pytest.mark.parametrize("command", SETTINGS_COMMANDS, ids=" ".join)
def test_every_command_rejects_bad_settings_and_unknown_flags(
    command: list[str], base_env: dict[str, str]
) -> None:
    bad_table, empty_stream, unknown_flag = _runs(
        base_env,
        [
            ["--set", "dlq_table=dlq;--", *command],
            ["--set", "stream=", *command],
            [*command, "--no-such-flag"],
        ],
    )
    assert_usage_error(bad_table, "dlq_table (flag --set dlq_table)", "not a valid table name")
    assert_usage_error(empty_stream, "stream (flag --set stream)", "must not be empty")
    assert_usage_error(unknown_flag, "No such option", "--no-such-flag")


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["serve", "--procs", "0"], "--procs"),
        (["serve", "--procs", "two"], "'auto' or a number"),
        (["serve", "--tasks", "0"], "--tasks"),
        (["serve", "--tasks", "1000"], "--tasks"),
        (["serve", "--batch-size", "x"], "--batch-size"),
        (["serve", "--metrics-port", "70000"], "--metrics-port"),
        (["produce"], "Missing argument"),
        (["produce", "0"], "N"),
        (["produce", "5", "--rate", "-1"], "--rate"),
        (["bench"], "--rate R and --duration D, or --drain N"),
        (["bench", "--drain", "5", "--rate", "10"], "cannot be combined"),
        (["monitor", "--interval", "0"], "--interval"),
        (["dlq", "purge", "--before", "yesterday", "--yes"], "yesterday"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_bad_command_flags_are_usage_errors(
    args: list[str], text: str, base_env: dict[str, str]
) -> None:
    assert_usage_error(run_streamd(base_env, *args), text)
