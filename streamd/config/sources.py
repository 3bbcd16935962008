"""Where settings come from: flags, environment (STREAMD_* and the original pipeline's .env
names), the config file and defaults. Each value is parsed and checked here; an error names the key
and the source of the bad value."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from streamd.config.durations import parse_retention
from streamd.config.names import (
    dead_stream_name_problem,
    group_name_problem,
    stream_name_problem,
)
from streamd.config.settings import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATHS,
    ENV_PREFIX,
    KEY_NAME,
    MASK,
    SECRET_KEYS,
    Settings,
    mask_url,
)
from streamd.config.tables import TABLE_NAME, is_pattern, parse_streams, parse_tables
from streamd.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# loading


@dataclass(frozen=True, slots=True)
class Sourced:
    """A raw value and where it came from, for error messages and `streamd config`."""

    value: Any
    source: str


# The original pipeline's .env names, accepted so its deployments keep working (a STREAMD_* name
# wins over these).
LEGACY_ENV = {
    "NUM_WORKERS": "tasks",
    "BATCH_SIZE": "batch_size",
    "BATCH_TIMEOUT_SECONDS": "batch_timeout_s",
    "XREAD_COUNT": "read_count",
    "XREAD_BLOCK_MS": "block_ms",
}
# STREAMD_* names that are not config keys: the config file's path, the dev and test servers'
# binaries, and how run.sh calls streamd (for the commands that hints name).
_NOT_KEYS = frozenset(
    {"STREAMD_CONFIG", "STREAMD_PG_BIN", "STREAMD_REDIS_SERVER", "STREAMD_PROMETHEUS_BIN"}
    | {"STREAMD_INVOKED_AS"}
)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Settings)]


def load_settings(
    *,
    config_file: str | None = None,
    flags: Mapping[str, Any] | None = None,
    set_values: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """Resolve settings; returns them and, for each key, where its value came from.

    `flags` are named command-line options; `set_values` come from `--set KEY=VALUE`.
    """
    env = os.environ if environ is None else environ
    layers: dict[str, Sourced] = {}
    path = _config_path(config_file, env)
    if path is not None:
        layers.update(_read_file(path))
    layers.update(_read_legacy_env(env))
    layers.update(_read_env(env))
    for key, value in (set_values or {}).items():
        layers[_check_key(key, "--set")] = Sourced(value, f"flag --set {key}")
    for key, value in (flags or {}).items():
        if value is not None:
            layers[_check_key(key, "flag")] = Sourced(value, f"flag {_flag_name(key)}")
    _resolve_secret_files(layers)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in dataclasses.fields(Settings):
        if f.name in layers:
            values[f.name] = _parse(f, layers[f.name])
            sources[f.name] = layers[f.name].source
        else:
            sources[f.name] = "default"
    settings = Settings(**values)
    _check_whole(settings, sources)
    return settings, sources


def _flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def _config_path(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    chosen = explicit or env.get(CONFIG_ENV)
    if chosen:
        path = Path(chosen)
        if not path.is_file():
            raise ConfigError(f"config file {chosen}: not found")
        return path
    return next((p for p in DEFAULT_CONFIG_PATHS if p.is_file()), None)


def _read_file(path: Path) -> dict[str, Sourced]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    out: dict[str, Sourced] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "tables":
            raise ConfigError(
                f"config file {path}: [{key}]: the only sections are [tables.<name>]; keys are flat"
            )
        out[_check_key(key, f"config file {path}")] = Sourced(value, f"config file {path}")
    return out


def _read_env(env: Mapping[str, str]) -> dict[str, Sourced]:
    out: dict[str, Sourced] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _NOT_KEYS:
            continue
        key = name[len(ENV_PREFIX) :].lower()
        out[_check_key(key, f"environment variable {name}")] = Sourced(value, f"env {name}")
    return out


def _read_legacy_env(env: Mapping[str, str]) -> dict[str, Sourced]:
    out = {
        key: Sourced(env[name], f"env {name}") for name, key in LEGACY_ENV.items() if name in env
    }
    if "REDIS_HOST" in env or "REDIS_PORT" in env:
        host = env.get("REDIS_HOST", "127.0.0.1")
        port = env.get("REDIS_PORT", "6379")
        out["redis_url"] = Sourced(f"redis://{_host(host)}:{port}/0", "env REDIS_HOST/REDIS_PORT")
    if "REDIS_PASSWORD" in env:
        out["redis_password"] = Sourced(env["REDIS_PASSWORD"], "env REDIS_PASSWORD")
    pg_names = ("POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB", "POSTGRES_USER")
    if any(name in env for name in pg_names):
        host = env.get("POSTGRES_HOST", "127.0.0.1")
        port = env.get("POSTGRES_PORT", "5432")
        user = quote(env.get("POSTGRES_USER", "postgres"), safe="")
        db = quote(env.get("POSTGRES_DB", "postgres"), safe="")
        dsn = f"postgresql://{user}@{_host(host)}:{port}/{db}"
        out["postgres_dsn"] = Sourced(dsn, "env POSTGRES_HOST/PORT/DB/USER")
    if "POSTGRES_PASSWORD" in env:
        out["postgres_password"] = Sourced(env["POSTGRES_PASSWORD"], "env POSTGRES_PASSWORD")
    return out


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _check_key(key: str, where: str) -> str:
    names = field_names()
    secret_files = [f"{k}_file" for k in SECRET_KEYS]
    if key in names or key in secret_files:
        return key
    hint = difflib.get_close_matches(key, names + secret_files, n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ConfigError(f"{where}: unknown config key {key!r}{suggestion}")


def _resolve_secret_files(layers: dict[str, Sourced]) -> None:
    """`<secret>_file` reads the secret from a file (systemd credentials, Docker/K8s secrets)."""
    for key in SECRET_KEYS:
        ref = layers.pop(f"{key}_file", None)
        if ref is None or not str(ref.value):
            continue
        path = Path(str(ref.value))
        try:
            secret = path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"{key}_file ({ref.source}): cannot read {path}: {reason}") from None
        current = layers.get(key)
        # An explicit password from a higher-precedence source still wins over a file.
        if current is None or _rank(ref.source) >= _rank(current.source):
            layers[key] = Sourced(secret, f"{ref.source} (file {path})")


def _rank(source: str) -> int:
    for rank, prefix in enumerate(("config file", "env", "flag")):
        if source.startswith(prefix):
            return rank
    return -1


# ---------------------------------------------------------------------------------------------
# parsing and checking


def _parse(f: dataclasses.Field[Any], raw: Sourced) -> Any:
    where = f"{f.name} ({raw.source})"
    value = raw.value
    kind = f.type if isinstance(f.type, str) else str(f.type)
    if f.metadata.get("kind") == "streams":
        return parse_streams(value, where)
    if f.metadata.get("kind") == "tables":
        return parse_tables(value, where)
    try:
        if kind == "bool":
            parsed: Any = _parse_bool(value)
        elif kind == "int":
            parsed = _parse_int(value)
        elif kind == "float":
            parsed = _parse_float(value)
        elif kind.startswith("bool | Literal"):
            parsed = _parse_bool_or_auto(value)
        elif kind.startswith("int | Literal"):
            parsed = value if value == "auto" else _parse_int(value)
        elif kind.startswith("Literal"):
            parsed = _parse_choice(value, re.findall(r"'([^']*)'", kind))
        else:
            if not isinstance(value, str):
                raise ValueError("must be a string")
            parsed = value
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc} (got {_show(f.name, value)})") from None
    _check_bounds(f, parsed, where, value)
    return parsed


def _show(key: str, value: Any) -> str:
    return repr(MASK) if key in SECRET_KEYS else repr(value)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _parse_bool_or_auto(value: Any) -> bool | str:
    if str(value).strip().lower() == "auto":
        return "auto"
    try:
        return _parse_bool(value)
    except ValueError:
        raise ValueError("must be true, false or auto") from None


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("must be an integer")
    if isinstance(value, int):
        return value
    text = str(value).strip().replace("_", "")
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ValueError("must be an integer")
    return int(text)


def _parse_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("must be a number")
    try:
        parsed = float(value)
    except (TypeError, ValueError):
        raise ValueError("must be a number") from None
    if parsed != parsed or parsed in (float("inf"), float("-inf")):
        raise ValueError("must be a finite number")
    return parsed


def _parse_choice(value: Any, choices: list[str]) -> str:
    text = str(value).strip().lower()
    if text not in choices:
        raise ValueError("must be one of " + ", ".join(choices))
    return text


def _check_bounds(f: dataclasses.Field[Any], parsed: Any, where: str, raw: Any) -> None:
    if isinstance(parsed, bool) or not isinstance(parsed, int | float):
        _check_text(f, parsed, where)
        return
    low, high = f.metadata.get("min"), f.metadata.get("max")
    if low is not None and parsed < low:
        raise ConfigError(f"{where}: must be >= {low} (got {raw!r})")
    if high is not None and parsed > high:
        raise ConfigError(f"{where}: must be <= {high} (got {raw!r})")


def _check_text(f: dataclasses.Field[Any], value: Any, where: str) -> None:
    kind = f.metadata.get("kind")
    if kind == "table" and not TABLE_NAME.fullmatch(value):
        raise ConfigError(
            f"{where}: {value!r} is not a valid table name "
            "(letters, digits, underscore; starts with a letter or underscore; at most 48)"
        )
    if kind == "retention":
        try:
            parse_retention(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc} (got {value!r})") from None
    if kind == "key" and value and not KEY_NAME.fullmatch(value):
        raise ConfigError(
            f"{where}: {value!r} is not a valid Redis key name here "
            "(letters, digits and _ : { } . -; at most 200)"
        )


def _check_whole(s: Settings, sources: Mapping[str, str]) -> None:
    def where(key: str) -> str:
        return f"{key} ({sources[key]})"

    _check_url(s.redis_url, ("redis", "rediss", "unix"), where("redis_url"))
    _check_url(s.postgres_dsn, ("postgres", "postgresql"), where("postgres_dsn"))
    if s.retry_max_s < s.retry_initial_s:
        raise ConfigError(f"{where('retry_max_s')}: must be >= retry_initial_s")
    _check_names(s, where)
    if s.dead_stream == s.stream:
        raise ConfigError(f"{where('dlq_stream')}: must differ from stream")
    tls = urlsplit(s.redis_url).scheme == "rediss"
    for key in ("redis_ca_file", "redis_cert_file", "redis_key_file"):
        path = getattr(s, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"{where(key)}: file {path} not found")
        if path and not tls:  # else the operator believes in TLS while we talk in clear
            raise ConfigError(f"{where(key)}: TLS files need a rediss:// redis_url")
    if not s.metrics_host:
        raise ConfigError(f"{where('metrics_host')}: must not be empty")
    try:
        socket.getaddrinfo(s.metrics_host, None)
    except OSError:
        raise ConfigError(f"{where('metrics_host')}: cannot resolve {s.metrics_host!r}") from None


def _check_names(s: Settings, where: Callable[[str], str]) -> None:
    """Names Redis would take that make no sense for streamd (config/names.py)."""
    checks = [
        ("stream", s.stream, stream_name_problem),
        ("group", s.group, group_name_problem),
        ("dlq_stream", s.dlq_stream, dead_stream_name_problem),
    ]
    checks += [("streams", name, stream_name_problem) for name in s.streams if not is_pattern(name)]
    for key, value, problem_of in checks:
        problem = problem_of(value)
        if problem is not None:
            raise ConfigError(f"{where(key)}: {problem}")


def _check_url(url: str, schemes: tuple[str, ...], where: str) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{where}: invalid URL {mask_url(url)!r}: {exc}") from None
    if parts.scheme not in schemes:
        wanted = ", ".join(f"{s}://" for s in schemes)
        raise ConfigError(f"{where}: {mask_url(url)!r} must start with one of {wanted}")
    if parts.scheme != "unix" and not parts.hostname and not parts.query:
        raise ConfigError(f"{where}: {mask_url(url)!r} has no host")
    if port == 0:
        raise ConfigError(f"{where}: {mask_url(url)!r} has port 0")
    if parts.scheme.startswith("postgres"):
        _check_postgres_tls(parse_qs(parts.query), where)
    else:
        _check_redis_url(
            parts.scheme, parts.path, parse_qs(parts.query), f"{where}: {mask_url(url)!r}"
        )


def _check_redis_url(scheme: str, path: str, query: dict[str, list[str]], where: str) -> None:
    """What redis-py would otherwise ignore (a bad db: database 0 instead) or fail on later (an
    unknown parameter: a crash in every worker). Timeouts and TLS come from streamd's own keys,
    so the URL may not override them."""
    if scheme == "unix" and not path:
        raise ConfigError(f"{where} has no socket path (unix:///path/to/redis.sock)")
    if scheme != "unix" and not re.fullmatch(r"/?|/\d+", path):
        raise ConfigError(f"{where}: the path must be a database number, as in /0")
    for name, values in query.items():
        if name != "db":
            raise ConfigError(
                f"{where}: URL parameter {name!r} is not supported (only db; timeouts and TLS "
                "are redis_timeout_s and redis_ca_file/redis_cert_file/redis_key_file)"
            )
        if not all(v.isdigit() for v in values):
            raise ConfigError(f"{where}: db must be a database number")


_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def _check_postgres_tls(query: dict[str, list[str]], where: str) -> None:
    """The DSN's TLS options, checked here so a typo is a config error (exit 2), not a failed
    connection at start that looks like an outage."""
    for mode in query.get("sslmode", []):
        if mode not in _SSLMODES:
            raise ConfigError(f"{where}: sslmode={mode!r} must be one of {', '.join(_SSLMODES)}")
    for name in ("sslrootcert", "sslcert", "sslkey", "sslcrl"):
        for path in query.get(name, []):
            if not Path(path).expanduser().is_file():
                raise ConfigError(f"{where}: {name}: file {path} not found")
