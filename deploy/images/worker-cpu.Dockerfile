# syntax=docker/dockerfile:1
# A CPU worker: torch 2.13.0 CPU build, transformers, peft, the bundled
# all-MiniLM-L6-v2 and BANKING77 (package data, linked at
# /usr/share/fedpilot/banking77). torch is installed from the CPU wheel index
# BEFORE the project, so the worker extra's torch range is already satisfied
# and nothing pulls a CUDA build; the build fails if it did.
#
# Build from the repository root:
#   docker build -f deploy/images/worker-cpu.Dockerfile -t fedpilot/worker-cpu:0.1.0 .
# BASE_IMAGE is any Debian bookworm image (Python 3.11 comes from Debian);
# deploy/images/debian-base.sh makes one with debootstrap. PIP_* pass a site's
# package mirror; TORCH_INDEX_URL is where the CPU torch wheel comes from.
# Run (a CPU worker needs an explicit budget):
#   docker run fedpilot/worker-cpu:0.1.0 fedpilot worker --coordinator HOST:50051 \
#       --data /usr/share/fedpilot/banking77/train.csv --memory-budget 2GiB --metrics-port 9100
ARG BASE_IMAGE=docker.io/library/debian:bookworm-20250520-slim

# ---- builder ----
FROM ${BASE_IMAGE} AS builder
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install pip==25.1.1
# torch first, from the CPU index (the layer is reused until the pin changes)
RUN /opt/venv/bin/pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL}" \
    && /opt/venv/bin/python -c "import torch; assert not torch.version.cuda, torch.__version__"
# The dependencies alone first: this layer is reused until pyproject.toml
# changes, so a code change rebuilds only the project's own layer.
COPY pyproject.toml ./
RUN /opt/venv/bin/python -c "import tomllib, sys; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; sys.stdout.write('\n'.join(p['dependencies'] + p['optional-dependencies']['worker']))" > /tmp/requirements.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt
COPY README.md ./
COPY fedpilot/ fedpilot/
COPY coordinator/ coordinator/
COPY worker/ worker/
COPY dashboard/ dashboard/
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install "$(ls /wheels/fedpilot-*.whl)[worker]" \
    && /opt/venv/bin/python -c "import torch; assert not torch.version.cuda, torch.__version__"

# ---- runtime ----
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="fedpilot-worker-cpu" \
      org.opencontainers.image.description="Fed-piLot worker, CPU build of torch" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 fedpilot \
    && useradd --system --uid 10001 --gid fedpilot --home-dir /home/fedpilot --create-home \
       --shell /usr/sbin/nologin fedpilot
COPY --from=builder /opt/venv /opt/venv
# The shipped BANKING77 at a path that does not change with Python's version.
RUN mkdir -p /usr/share/fedpilot \
    && ln -s "$(/opt/venv/bin/python -c 'import fedpilot.datasets as d; print(d.BUNDLED_BANKING77)')" \
       /usr/share/fedpilot/banking77 \
    && test -s /usr/share/fedpilot/banking77/train.csv
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
