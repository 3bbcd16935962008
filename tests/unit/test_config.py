"""Settings resolution: precedence, parsing, validation, masking (pure logic, no services)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from streamd.config.settings import Settings, mask_url
from streamd.config.sources import LEGACY_ENV, field_names, load_settings
from streamd.config.view import render_config, render_defaults, render_reference
from streamd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def load(
    environ: dict[str, str] | None = None, **kwargs: object
) -> tuple[Settings, dict[str, str]]:
    return load_settings(environ=environ or {}, **kwargs)  # type: ignore[arg-type]


def test_defaults_match_the_data_contract() -> None:
    s, sources = load(config_file=None)
    assert (s.stream, s.group, s.events_table, s.dead_stream, s.dlq_table) == (
        "events",
        "streamd",
        "events",
        "events:dead",
        "dead_letter_queue",
    )
    # The seed's batching was 500 / COUNT 100; streamd's defaults come from bench/ (fewer round
    # trips per event), and the seed's names still set them (test below).
    assert (s.batch_size, s.batch_timeout_s, s.read_count, s.block_ms, s.tasks) == (
        2000,
        2.0,
        2000,
        5000,
        5,
    )
    assert set(sources.values()) == {"default"}


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    conf = tmp_path / "streamd.toml"
    conf.write_text("batch_size = 10\nread_count = 7\ntasks = 3\n")
    env = {"STREAMD_BATCH_SIZE": "20", "STREAMD_READ_COUNT": "8"}
    s, sources = load(env, config_file=str(conf), flags={"batch_size": 30})
    assert (s.batch_size, s.read_count, s.tasks, s.block_ms) == (30, 8, 3, 5000)
    assert sources["batch_size"] == "flag --batch-size"
    assert sources["read_count"] == "env STREAMD_READ_COUNT"
    assert sources["tasks"].startswith("config file")
    assert sources["block_ms"] == "default"


def test_seed_env_names_are_understood_and_streamd_names_win() -> None:
    env = {
        "REDIS_HOST": "redis.internal",
        "REDIS_PORT": "6380",
        "POSTGRES_HOST": "pg.internal",
        "POSTGRES_PORT": "5433",
        "POSTGRES_DB": "streaming",
        "POSTGRES_USER": "streaming_user",
        "POSTGRES_PASSWORD": "streaming_pass",
        "NUM_WORKERS": "7",
        "BATCH_SIZE": "250",
        "BATCH_TIMEOUT_SECONDS": "1.5",
        "XREAD_COUNT": "50",
        "XREAD_BLOCK_MS": "1000",
    }
    s, _ = load(env)
    assert s.redis_url == "redis://redis.internal:6380/0"
    assert s.postgres_dsn == "postgresql://streaming_user@pg.internal:5433/streaming"
    assert s.postgres_password == "streaming_pass"
    assert (s.tasks, s.batch_size, s.batch_timeout_s, s.read_count, s.block_ms) == (
        7,
        250,
        1.5,
        50,
        1000,
    )
    s, _ = load({**env, "STREAMD_BATCH_SIZE": "99", "STREAMD_REDIS_URL": "redis://x:1/0"})
    assert (s.batch_size, s.redis_url) == (99, "redis://x:1/0")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STREAMD_BATCH_SIZE": "abc"}, "batch_size (env STREAMD_BATCH_SIZE): must be an integer"),
        ({"STREAMD_BATCH_SIZE": "0"}, "batch_size (env STREAMD_BATCH_SIZE): must be >= 1"),
        ({"STREAMD_BATCH_TIMEOUT_S": "nan"}, "must be a finite number"),
        ({"STREAMD_TRIM": "maybe"}, "trim (env STREAMD_TRIM): must be true or false"),
        ({"STREAMD_LOG_LEVEL": "loud"}, "must be one of debug, info, warning, error"),
        ({"STREAMD_PROCS": "many"}, "procs (env STREAMD_PROCS): must be an integer"),
        ({"STREAMD_BACH_SIZE": "1"}, "unknown config key 'bach_size' (did you mean 'batch_size'?)"),
        ({"STREAMD_EVENTS_TABLE": "events; DROP TABLE x"}, "is not a valid table name"),
        ({"STREAMD_DLQ_TABLE": '"quoted"'}, "is not a valid table name"),
        ({"STREAMD_STREAM": "has space"}, "is not a valid Redis key name"),
        ({"STREAMD_REDIS_URL": "http://localhost"}, "must start with one of redis://"),
        ({"STREAMD_POSTGRES_DSN": "mysql://u@h/db"}, "must start with one of postgres://"),
        ({"STREAMD_REDIS_URL": "redis://h:notaport/0"}, "invalid URL"),
        ({"STREAMD_DLQ_STREAM": "events"}, "must differ from stream"),
        ({"STREAMD_STREAM": ""}, "stream (env STREAMD_STREAM): the stream name must not be empty"),
        ({"STREAMD_STREAM": "-"}, "'-' is not a usable stream name (it needs a letter or a digit)"),
        ({"STREAMD_STREAM": "orders:dead"}, "ends in ':dead', the suffix of dead-letter streams"),
        ({"STREAMD_STREAMS": "a,b:dead"}, "streams (env STREAMD_STREAMS): 'b:dead' ends in"),
        ({"STREAMD_GROUP": ""}, "group (env STREAMD_GROUP): the consumer group name must not be"),
        ({"STREAMD_GROUP": "{}"}, "'{}' is not a usable consumer group name"),
        ({"STREAMD_DLQ_STREAM": "::"}, "'::' is not a usable dead-letter stream name"),
        ({"STREAMD_RETRY_MAX_S": "0.01"}, "must be >= retry_initial_s"),
        ({"STREAMD_POSTGRES_PASSWORD_FILE": "/nonexistent/pw"}, "cannot read /nonexistent/pw"),
        ({"STREAMD_REDIS_CA_FILE": "/nonexistent/ca.pem"}, "file /nonexistent/ca.pem not found"),
    ],
)
def test_invalid_values_name_the_key_and_source(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(env)
    assert message in str(caught.value)


def test_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load(config_file=str(bad))
    bad.write_text("[redis]\nurl = 'redis://x'\n")
    with pytest.raises(ConfigError, match=r"the only sections are \[tables"):
        load(config_file=str(bad))
    bad.write_text("batchsize = 3\n")
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load(config_file=str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load(config_file=str(tmp_path / "missing.toml"))


def test_password_file_and_masking(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cr3t-from-file\n")
    env = {
        "STREAMD_POSTGRES_PASSWORD_FILE": str(secret),
        "STREAMD_REDIS_URL": "redis://:urlpass@127.0.0.1:6379/0",
        "STREAMD_POSTGRES_DSN": "postgresql://u:dsnpass@h/db?password=qp",
    }
    s, sources = load(env)
    assert s.postgres_password == "s3cr3t-from-file"
    assert "file" in sources["postgres_password"]
    rendered = render_config(s, sources) + render_config(s, sources, as_json=True)
    for secret_text in ("s3cr3t-from-file", "urlpass", "dsnpass", "qp"):
        assert secret_text not in rendered
    assert "***" in rendered


def test_mask_url() -> None:
    assert mask_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert mask_url("postgresql://user:pw@h/db") == "postgresql://user:***@h/db"
    assert mask_url("postgresql://user@h/db") == "postgresql://user@h/db"
    assert mask_url("rediss://u:p%40ss@h/0") == "rediss://u:***@h/0"
    # no host in the URL (a Unix socket given as a parameter): shown as written
    socket_dsn = "postgresql:///app?host=/var/run/postgresql"
    assert mask_url(socket_dsn) == socket_dsn
    assert mask_url("postgresql:///app?password=pw#f") == "postgresql:///app?password=***#f"
    assert mask_url("unix:///run/redis.sock?db=0") == "unix:///run/redis.sock?db=0"


def test_shipped_config_file_documents_every_key() -> None:
    shipped = (ROOT / "conf" / "streamd.toml").read_text()
    assert shipped.strip() == render_defaults().strip(), (
        "conf/streamd.toml is stale: run `streamd config --defaults > conf/streamd.toml`"
    )
    for name in field_names():
        assert f"# {name} = " in shipped
    # Loading it as-is (everything commented out) gives the defaults.
    s, _ = load(config_file=str(ROOT / "conf" / "streamd.toml"))
    assert s == Settings()


def test_cli_config_error_is_one_line_and_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamd", "--set", "batch_size=-5", "config"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "batch_size (flag --set batch_size): must be >= 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_and_set_work_after_the_command_too(tmp_path: Path) -> None:
    """`streamd serve --config FILE` (the systemd unit's form) is `streamd --config FILE serve`;
    given in both places, the command's own wins, and --set values from both are merged."""
    ignored, used = tmp_path / "ignored.toml", tmp_path / "used.toml"
    ignored.write_text("batch_size = 111\n")
    used.write_text("batch_size = 222\n")
    argv = [sys.executable, "-m", "streamd", "--config", str(ignored), "--set", "tasks=7"]
    argv += ["config", "--json", "--config", str(used), "--set", "read_count=33"]
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)["settings"]
    assert (shown["batch_size"], shown["tasks"], shown["read_count"]) == (222, 7, 33)


def test_docs_reference_lists_every_key_with_its_default() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    begin, end = "<!-- BEGIN GENERATED: streamd config reference", "<!-- END GENERATED -->"
    assert page.count(begin) == 1 and page.count(end) == 1, "docs/configuration.md: markers lost"
    generated = page.split(begin)[1].split("\n", 1)[1].split(end)[0]
    assert generated.strip() == render_reference().strip(), (
        "docs/configuration.md's config reference is stale: paste"
        " streamd.config_view.render_reference() between its GENERATED markers"
    )


def test_env_example_and_compose_use_streamd_defaults() -> None:
    """.env.example and docker-compose.yml spell the seed's names, with streamd's values: a user
    who copies them must not get the seed's slower batching by accident."""
    defaults = Settings()
    example = dict(
        line.split("#", 1)[0].strip().split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    compose = dict(
        re.findall(r"(\w+): \$\{\1:-([^}]*)\}", (ROOT / "docker-compose.yml").read_text())
    )
    for name, key in LEGACY_ENV.items():
        want = getattr(defaults, key)
        assert type(want)(example[name]) == want, f".env.example {name}"
        # Compose hands .env over whole (env_file); a default it spells must be streamd's too.
        if name in compose:
            assert type(want)(compose[name]) == want, f"docker-compose.yml {name}"
