# syntax=docker/dockerfile:1
# A CUDA worker: the CUDA 12.8 build of torch 2.13.0 on an nvidia/cuda runtime
# base (Ubuntu 24.04, Python 3.12). The budget is the GPU's free memory minus
# --safety-margin, optionally lowered with --memory-budget.
#
# Build from the repository root:
#   docker build -f deploy/images/worker-cuda.Dockerfile -t fedpilot/worker-cuda:0.1.0 .
# Run on a host with the NVIDIA container toolkit:
#   docker run --gpus 1 fedpilot/worker-cuda:0.1.0 fedpilot worker --coordinator HOST:50051 \
#       --data /data/train.csv --device cuda:0 --safety-margin 1GiB --metrics-port 9100

# ---- builder ----
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Ubuntu's python3.12 follows the distribution's security updates; apt
# versions are not pinned (they are replaced in the archive by every update).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3.12 -m venv /opt/venv \
    && /opt/venv/bin/pip install pip==25.1.1
RUN /opt/venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml README.md ./
COPY fedpilot/ fedpilot/
COPY coordinator/ coordinator/
COPY worker/ worker/
COPY dashboard/ dashboard/
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install "$(ls /wheels/fedpilot-*.whl)[worker]" \
    && /opt/venv/bin/python -c "import torch; assert torch.version.cuda, torch.__version__"

# ---- runtime ----
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS runtime
LABEL org.opencontainers.image.title="fedpilot-worker-cuda" \
      org.opencontainers.image.description="Fed-piLot worker, CUDA 12.8 build of torch" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 fedpilot \
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
    TOKENIZERS_PARALLELISM=false \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/fedpilot
USER 10001:10001
EXPOSE 9100
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=4)"]
CMD ["fedpilot", "worker", "--help"]
