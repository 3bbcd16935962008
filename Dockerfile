# streamd: the serve process, built with uv from the locked dependencies (docs/operations.md).
#   docker build -t streamd .
#   docker run --init --env-file .env -p 127.0.0.1:9465:9465 streamd
FROM python:3.11-slim

# uv from its official image, the version this project is developed with.
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /uvx /bin/

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /app

# Dependencies first, in their own layer: it is rebuilt only when uv.lock changes.
COPY pyproject.toml uv.lock README.md ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-project

# Then streamd itself, installed as a wheel (init.sql goes inside the package).
COPY streamd ./streamd
COPY init.sql ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

# Runs `streamd ARGS` and passes signals on; turns serve's exits 2 and 78 (a mistake a restart
# cannot fix) into 0, so that `restart: on-failure` does not loop on them.
COPY --chmod=0755 deploy/docker/entrypoint.py /usr/local/bin/streamd-entrypoint

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin streamd
USER streamd

# Metrics on every interface of the container's own network (publish with -p to reach them).
# The drain on SIGTERM fits in `docker stop`'s default 10 s before SIGKILL; give a longer drain
# a longer stop timeout too (docker-compose.yml: 30 s drain, stop_grace_period 45 s;
# docker run --stop-timeout 45 -e STREAMD_GRACEFUL_TIMEOUT_S=30).
ENV PATH="/app/.venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    STREAMD_LOG_FORMAT=json \
    STREAMD_METRICS_HOST=0.0.0.0 \
    STREAMD_METRICS_PORT=9465 \
    STREAMD_GRACEFUL_TIMEOUT_S=8
EXPOSE 9465

# /healthz of the running serve: its supervisor is alive. (`streamd health --ready` would also
# require Redis and Postgres up; an outage is waited out, not a reason to replace the container.)
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
    CMD ["streamd", "health"]

# SIGTERM drains: stop reading, flush, commit, acknowledge, exit 0 within graceful_timeout_s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["streamd-entrypoint"]
CMD ["serve"]
