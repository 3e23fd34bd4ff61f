# ecif-audit: one image for the API, the workers and the migration job.
#   docker build -t ecif-audit:latest .
# The default command runs the API; workers override it (`ecif worker --queues gpu|cpu ...`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

# Non-root user; the store folder exists and belongs to it, so a fresh named volume mounted
# there inherits that ownership.
RUN useradd --create-home --uid 10001 --user-group ecif \
 && mkdir -p /var/lib/ecif/store /data \
 && chown ecif:ecif /var/lib/ecif/store

WORKDIR /app

# torch first, in a layer of its own: the largest download, it changes only with the pins
# (the same pins as pyproject.toml; tests/services/test_deploy.py compares them).
RUN pip install torch==2.14.1 torchvision==0.29.1

# The source tree stays in /app (editable install): the package finds its Alembic migrations
# at <repo>/migrations. Copied by name rather than `COPY . .` so a local .venv, caches and
# run outputs stay out of the image.
COPY pyproject.toml README.md ./
COPY ecif_core ./ecif_core
COPY services ./services
COPY workers ./workers
COPY migrations ./migrations
RUN pip install -e ".[service]"

USER ecif
EXPOSE 8000
CMD ["ecif", "serve", "--host", "0.0.0.0"]
