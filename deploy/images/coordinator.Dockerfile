# syntax=docker/dockerfile:1
# The coordinator: gRPC on 50051, REST API + dashboard + /metrics on 8080.
# No torch in this image: the coordinator's algorithms need numpy only
# (docs/architecture.md). Server-side evaluation (a job's eval_dataset) needs
# the worker extra; run it with the CPU worker image instead if you want it.
#
# Build from the repository root:
#   docker build -f deploy/images/coordinator.Dockerfile -t fedpilot/coordinator:0.1.0 .

# ---- builder: the project as a wheel, installed into /opt/venv ----
FROM python:3.12.10-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install pip==25.1.1
COPY pyproject.toml README.md ./
COPY fedpilot/ fedpilot/
COPY coordinator/ coordinator/
COPY worker/ worker/
COPY dashboard/ dashboard/
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install /wheels/fedpilot-*.whl

# ---- runtime: the venv only, as an unprivileged user ----
FROM python:3.12.10-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="fedpilot-coordinator" \
      org.opencontainers.image.description="Fed-piLot coordinator: gRPC, REST API, dashboard, Prometheus metrics" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 fedpilot \
    && useradd --system --uid 10001 --gid fedpilot --home-dir /home/fedpilot --create-home \
       --shell /usr/sbin/nologin fedpilot \
    && mkdir /data \
    && chown fedpilot:fedpilot /data
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/fedpilot
USER 10001:10001
VOLUME ["/data"]
EXPOSE 50051 8080
# Ready = the database answers and is at the newest migration (GET /readyz).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=4)"]
CMD ["fedpilot", "coordinator", "--host", "0.0.0.0", "--port", "50051", "--http-host", "0.0.0.0", "--http-port", "8080", "--data-dir", "/data"]
