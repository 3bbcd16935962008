# streamd: the serve process, built with uv from the locked dependencies.
#   docker build -t streamd .        docker run --env-file .env streamd
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

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin streamd
USER streamd

ENV PATH="/app/.venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    STREAMD_LOG_FORMAT=json

# SIGTERM drains: stop reading, flush, commit, acknowledge, exit 0 (give it graceful_timeout_s).
STOPSIGNAL SIGTERM
CMD ["streamd", "serve"]
