# classmeans-serve: CPU-only image. Build:  docker build -t classmeans-serve .   (or: docker compose up --build)
#
# Every pip command lives in docker/install.sh, which CI runs too (tests/deploy/test_install.py): do not add
# pip commands here. Torch and torchvision come from PyTorch's CPU wheel index, so the image carries no CUDA.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app

# Layer 1: torch + torchvision CPU wheels (large; cached across code changes).
COPY docker/install.sh docker/install.sh
RUN sh docker/install.sh --venv /opt/venv --torch-index "$TORCH_INDEX_URL" --step torch

# Layer 2: the project and its remaining dependencies (torch is already satisfied, so it stays the CPU build).
COPY pyproject.toml README.md ./
COPY service ./service
RUN sh docker/install.sh --venv /opt/venv --torch-index "$TORCH_INDEX_URL" --step project

# The start step (entrypoint.sh, also run by CI) and the healthcheck probe (stdlib only; the image has no curl).
COPY docker/entrypoint.sh docker/healthcheck.py docker/

# The embedded model store, read-only; entrypoint.sh seeds the writable store (a volume) from it on start.
COPY model_store/ /opt/classmeans/model_store/

# The group first: `useradd --user-group` would give it a system gid, not 10001.
RUN groupadd --system --gid 10001 classmeans \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /var/lib/classmeans --no-create-home \
        classmeans \
    && mkdir -p /var/lib/classmeans/model_store \
    && chown -R 10001:10001 /var/lib/classmeans

# Uploaded bundles, active.json and the generated admin token (when none is set) live in this volume.
VOLUME ["/var/lib/classmeans/model_store"]

ENV CLASSMEANS_STORE=/var/lib/classmeans/model_store \
    EMBEDDED_MODEL_STORE=/opt/classmeans/model_store \
    CLASSMEANS_HOST=0.0.0.0 \
    CLASSMEANS_PORT=8000 \
    HOME=/var/lib/classmeans \
    MPLCONFIGDIR=/tmp/matplotlib \
    ORT_DISABLE_TELEMETRY=1

USER 10001:10001
EXPOSE 8000

# uvicorn drains in-flight requests on SIGTERM for up to CLASSMEANS_GRACEFUL_TIMEOUT_S (30 s); give the
# container more than that before SIGKILL: docker-compose.yml sets stop_grace_period: 45s (docker stop -t 45).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py", "/v2/health/ready"]

ENTRYPOINT ["/bin/sh", "/app/docker/entrypoint.sh"]
CMD ["classmeans", "serve"]
