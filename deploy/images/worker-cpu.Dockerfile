# syntax=docker/dockerfile:1
# A CPU worker: torch 2.13.0 CPU build, transformers, peft and the bundled
# all-MiniLM-L6-v2. torch is installed from the CPU wheel index BEFORE the
# project, so the worker extra's torch range is already satisfied and nothing
# pulls a CUDA build.
#
# Build from the repository root:
#   docker build -f deploy/images/worker-cpu.Dockerfile -t fedpilot/worker-cpu:0.1.0 .
# Run (a CPU worker needs an explicit budget):
#   docker run fedpilot/worker-cpu:0.1.0 fedpilot worker --coordinator HOST:50051 \
#       --data /data/train.csv --memory-budget 2GiB --metrics-port 9100

# ---- builder ----
FROM python:3.12.10-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install pip==25.1.1
# torch first, from the CPU index (the layer is reused until the pin changes)
RUN /opt/venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY fedpilot/ fedpilot/
COPY coordinator/ coordinator/
COPY worker/ worker/
COPY dashboard/ dashboard/
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install "$(ls /wheels/fedpilot-*.whl)[worker]" \
    && /opt/venv/bin/python -c "import torch; assert not torch.version.cuda, torch.__version__"

# ---- runtime ----
FROM python:3.12.10-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="fedpilot-worker-cpu" \
      org.opencontainers.image.description="Fed-piLot worker, CPU build of torch" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 fedpilot \
    && useradd --system --uid 10001 --gid fedpilot --home-dir /home/fedpilot --create-home \
       --shell /usr/sbin/nologin fedpilot
COPY --from=builder /opt/venv /opt/venv
# TOKENIZERS_PARALLELISM is a tokenizers switch, not a credential (DL3064 matches "TOKEN").
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
WORKDIR /home/fedpilot
USER 10001:10001
EXPOSE 9100
# Healthy = the worker's Prometheus endpoint answers; run it with --metrics-port 9100.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=4)"]
CMD ["fedpilot", "worker", "--help"]
