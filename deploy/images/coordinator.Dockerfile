# syntax=docker/dockerfile:1
# The coordinator: gRPC on 50051, REST API + dashboard + /metrics on 8080.
# No torch in this image: the coordinator's algorithms and the PEFT adapter
# export need numpy and safetensors only (docs/architecture.md). Server-side
# evaluation (a job's eval_dataset) needs the worker extra; run it with the
# CPU worker image instead if you want it.
#
# Build from the repository root:
#   docker build -f deploy/images/coordinator.Dockerfile -t fedpilot/coordinator:0.1.0 .
# BASE_IMAGE is any Debian bookworm image (Python 3.11 comes from Debian);
# deploy/images/debian-base.sh makes one with debootstrap where no registry is
# reachable. PIP_INDEX_URL, PIP_EXTRA_INDEX_URL and PIP_FIND_LINKS pass a
# site's package mirror to pip (scripts/stack-test passes the host's).
ARG BASE_IMAGE=docker.io/library/debian:bookworm-20250520-slim

# ---- builder: the project as a wheel, installed into /opt/venv ----
FROM ${BASE_IMAGE} AS builder
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Debian's python3 follows the distribution's security updates; apt versions
# are not pinned (every update replaces them in the archive).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install pip==25.1.1
# The dependencies alone first: this layer is reused until pyproject.toml
# changes, so a code change rebuilds only the project's own layer.
COPY pyproject.toml ./
RUN /opt/venv/bin/python -c "import tomllib, sys; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; sys.stdout.write('\n'.join(p['dependencies']))" > /tmp/requirements.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt
COPY README.md ./
COPY fedpilot/ fedpilot/
COPY coordinator/ coordinator/
COPY worker/ worker/
COPY dashboard/ dashboard/
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install /wheels/fedpilot-*.whl \
    && /opt/venv/bin/python -c "import importlib.util as u; assert u.find_spec('torch') is None"

# ---- runtime: Debian's python3 and the venv, as an unprivileged user ----
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="fedpilot-coordinator" \
      org.opencontainers.image.description="Fed-piLot coordinator: gRPC, REST API, dashboard, Prometheus metrics" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# /certs: where compose's one-shot certificate service writes (fedpilot certs).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 fedpilot \
    && useradd --system --uid 10001 --gid fedpilot --home-dir /home/fedpilot --create-home \
       --shell /usr/sbin/nologin fedpilot \
    && mkdir /data /certs \
    && chown fedpilot:fedpilot /data /certs
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/fedpilot
USER 10001:10001
VOLUME ["/data"]
EXPOSE 50051 8080
# Ready = the database answers and is at the newest migration (GET /readyz);
# over https when the coordinator serves TLS (FEDPILOT_TLS_CERT set).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request as r; tls = bool(os.environ.get('FEDPILOT_TLS_CERT')); ctx = ssl._create_unverified_context() if tls else None; r.urlopen(('https' if tls else 'http') + '://127.0.0.1:8080/readyz', timeout=4, context=ctx)"]
CMD ["fedpilot", "coordinator", "--host", "0.0.0.0", "--port", "50051", "--http-host", "0.0.0.0", "--http-port", "8080", "--data-dir", "/data"]
