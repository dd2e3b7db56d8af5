"""docker-compose.yml, run without Docker: its coordinator and workers as local processes.

The same ``fedpilot`` command lines and environment as the compose services,
with only what a container engine would provide replaced:

- service hostnames -> 127.0.0.1, and each listening port -> a free port;
- volumes (named volumes, the workers' data folder) -> temporary directories;
  the data is a small synthetic CSV, given the way an operator gives their
  own (``FEDPILOT_DATA_DIR``, ``FEDPILOT_TRAIN_CSV``);
- the one-shot ``certs`` service's script runs first, with the same paths
  remapped, so the coordinator serves TLS and the workers verify it;
- the ``postgres`` service -> a fresh database on the machine's PostgreSQL;
- ``--threads 1`` (two cores are shared by everything here).

Then a job derived from examples/job.yaml (the tiny random BERT of
tests/models.py, 2 rounds) is submitted with ``fedpilot submit`` and watched
until it is done; the Prometheus targets of deploy/prometheus/prometheus.yml
and the compose health check are exercised on the way.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from fedpilot.cluster import write_csv
from tests.deploy.manifests import (
    PROMETHEUS_FILE,
    REPO,
    load_compose,
    option,
    service_argv,
    service_env,
    shell_commands,
)

pytestmark = pytest.mark.slow

LABELS = 3  # tests/models.py TINY_LABELS
PORT_FLAGS = ("--port", "--http-port", "--metrics-port")
HOST_FLAGS = ("--host", "--http-host")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ComposeAsProcesses:
    """Maps compose services onto local processes."""

    def __init__(self, compose: dict[str, Any], work: Path, db_url: str) -> None:
        self.compose = compose
        self.work = work
        self.db_url = db_url
        self.services = {
            name: svc
            for name, svc in compose["services"].items()
            if service_argv(svc)[:1] == ["fedpilot"] and not svc.get("profiles")
        }
        self.ports: dict[tuple[str, int], int] = {}
        for name, svc in self.services.items():
            argv = service_argv(svc)
            for flag in PORT_FLAGS:
                if (value := option(argv, flag)) is not None:
                    self.ports[(name, int(value))] = free_port()
        self.mounts: dict[str, dict[str, Path]] = {}
        for name, svc in compose["services"].items():
            self.mounts[name] = {}
            for mount in svc.get("volumes", []):
                source, target = mount.split(":")[:2]
                if source in compose.get("volumes", {}):  # named volume: a directory
                    path = work / "volumes" / source
                    path.mkdir(parents=True, exist_ok=True)
                else:  # a bind mount: relative to the compose file
                    path = (REPO / source).resolve()
                    assert path.exists(), f"{name}: bind source {source} missing"
                self.mounts[name][target] = path
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.extra_env: dict[str, dict[str, str]] = {}
        """Set by the test beside the compose environment (e.g. where the tiny model is)."""

    def port(self, service: str, container_port: int) -> int:
        return self.ports[(service, container_port)]

    def argv(self, name: str) -> list[str]:
        out: list[str] = []
        argv = service_argv(self.services[name])
        for i, arg in enumerate(argv):
            flag = argv[i - 1] if i else ""
            if flag in PORT_FLAGS:
                arg = str(self.port(name, int(arg)))
            elif flag in HOST_FLAGS:
                arg = "127.0.0.1"
            elif flag == "--threads":
                arg = "1"
            elif ":" in arg and arg.split(":")[0] in self.compose["services"]:
                host, port = arg.split(":")
                arg = f"127.0.0.1:{self.port(host, int(port))}"
            else:
                for target, path in self.mounts[name].items():
                    if arg == target or arg.startswith(target + "/"):
                        arg = str(path) + arg[len(target) :]
            out.append(arg)
        if argv[1] == "worker" and "--threads" not in argv:
            out += ["--threads", "1"]
        return out

    def remap_paths(self, name: str, text: str) -> str:
        """Container paths under ``name``'s mounts -> the local directories (longest first)."""
        for target in sorted(self.mounts[name], key=len, reverse=True):
            pattern = rf"(?<![\w/-]){re.escape(target)}(?=/|\s|'|\"|$)"
            text = re.sub(pattern, str(self.mounts[name][target]), text)
        return text

    def issue_certificates(self) -> None:
        """The ``certs`` service: its shell script, run here with its paths remapped."""
        script = service_argv(self.compose["services"]["certs"])
        commands = shell_commands(script)
        assert any(c[:2] == ["fedpilot", "certs"] for c in commands), script
        local = self.remap_paths("certs", script[2]).replace(
            "fedpilot certs", f"{Path(sys.executable).parent / 'fedpilot'} certs"
        )
        for _ in range(2):  # a second run keeps what the first one issued
            done = subprocess.run(["sh", "-c", local], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stdout + done.stderr

    def env(self, name: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDPILOT_")}
        for key, value in service_env(self.services[name]).items():
            if key == "FEDPILOT_DATABASE_URL":
                host = value.split("@", 1)[1].split(":")[0].split("/")[0]
                assert self.compose["services"][host]["image"].startswith("postgres:")
                value = self.db_url
            else:
                value = self.remap_paths(name, value)
            env[key] = value
        env.update(self.extra_env.get(name, {}))
        env.update(
            PYTHONUNBUFFERED="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
        )
        return env

    def start(self, name: str) -> subprocess.Popen[bytes]:
        argv = self.argv(name)
        assert argv[0] == "fedpilot"
        log = (self.work / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedpilot.cli", *argv[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(name),
            cwd=self.work,
            start_new_session=True,
        )
        self.processes[name] = proc
        return proc

    def logs(self) -> str:
        parts = []
        for name in self.processes:
            path = self.work / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {name} ---\n{text[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def healthcheck(compose: ComposeAsProcesses, name: str) -> list[str]:
    """The service's compose health check, pointed at the remapped port and paths."""
    test = list(compose.services[name]["healthcheck"]["test"])
    assert test[0] == "CMD-SHELL" and test[1].startswith("python -c "), test
    script = compose.remap_paths(name, test[1]).replace("python -c ", f"{sys.executable} -c ", 1)
    for (service, container_port), port in compose.ports.items():
        if service == name:
            script = script.replace(f"127.0.0.1:{container_port}/", f"127.0.0.1:{port}/")
    return ["sh", "-c", script]


@pytest.fixture
def cluster(
    tmp_path: Path, tiny_dir: Path, pg_url: str
) -> Iterator[tuple[ComposeAsProcesses, Path]]:
    from fedpilot.worker.data import synthetic_dataset

    data = synthetic_dataset(240, LABELS, seed=0)
    (tmp_path / "site").mkdir()
    write_csv(
        tmp_path / "site" / "train.csv", data.texts, [data.label_names[y] for y in data.labels]
    )
    site = {"FEDPILOT_DATA_DIR": str(tmp_path / "site"), "FEDPILOT_TRAIN_CSV": "/data/train.csv"}
    processes = ComposeAsProcesses(load_compose(site), tmp_path, pg_url)
    try:
        yield processes, tiny_dir
    finally:
        processes.stop()


def wait_until(predicate: Any, timeout: float, what: str, cluster: ComposeAsProcesses) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode}\n{cluster.logs()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{cluster.logs()}")
        time.sleep(0.5)


def test_compose_services_run_a_job(cluster: tuple[ComposeAsProcesses, Path]) -> None:
    from fedpilot.api_client import TERMINAL, ApiClient, ApiError

    compose, tiny_dir = cluster
    (coordinator,) = [n for n, s in compose.services.items() if service_argv(s)[1] == "coordinator"]
    workers = [n for n, s in compose.services.items() if service_argv(s)[1] == "worker"]
    assert len(workers) == 3

    compose.issue_certificates()
    ca = compose.mounts[coordinator]["/tls"] / "ca.pem"
    assert not (compose.mounts[coordinator]["/tls"] / "ca-key.pem").exists()
    # the tiny model stands in for the bundled one: the coordinator may read it
    roots = [str(tiny_dir), str(compose.mounts[coordinator]["/data"])]
    compose.extra_env[coordinator] = {"FEDPILOT_DATA_ROOTS": json.dumps(roots)}
    compose.start(coordinator)
    check = healthcheck(compose, coordinator)
    wait_until(
        lambda: subprocess.run(check, capture_output=True, timeout=30).returncode == 0,
        120,
        "the coordinator's compose health check",
        compose,
    )
    for worker in workers:
        compose.start(worker)

    coordinator_argv = service_argv(compose.services[coordinator])
    http_port = int(option(coordinator_argv, "--http-port") or 0)
    api = f"https://127.0.0.1:{compose.port(coordinator, http_port)}"
    token = service_env(compose.services[coordinator])["FEDPILOT_API_TOKEN"]
    with pytest.raises(ApiError) as refused, ApiClient(api, "not-the-token", ca=str(ca)) as client:
        client.jobs()
    assert refused.value.status in (401, 403)
    # plaintext is not served, and a client without the CA does not trust it
    with pytest.raises(ApiError), ApiClient(api.replace("https", "http"), token) as client:
        client.jobs()
    with pytest.raises(ApiError), ApiClient(api, token) as client:
        client.jobs()

    spec = yaml.safe_load((REPO / "examples" / "job.yaml").read_text())
    spec.update(
        name="compose-as-processes",
        model=str(tiny_dir),
        labels=[f"class{k}" for k in range(LABELS)],
        rounds=2,
        min_workers=len(workers),
        local_steps=2,
        batch_size=8,
        max_seq_len=16,
        round_deadline_s=120,
        ig_probe_batches=1,
    )
    job_file = compose.work / "job.yaml"
    job_file.write_text(yaml.safe_dump(spec))
    submit_env = {k: v for k, v in os.environ.items() if not k.startswith("FEDPILOT_")}
    submit_env["FEDPILOT_API_TOKEN"] = token
    submit_env["FEDPILOT_API_CA"] = str(ca)
    submitted = subprocess.run(
        [sys.executable, "-m", "fedpilot.cli", "submit", str(job_file), "--api", api],
        capture_output=True,
        text=True,
        env=submit_env,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]

    state: dict[str, Any] = {}
    with ApiClient(api, token, ca=str(ca)) as client:

        def finished() -> bool:
            state.update(client.job(job_id))
            return state["state"] in TERMINAL

        wait_until(finished, 150, f"job {job_id} to finish", compose)
        assert state["state"] == "done", f"{state}\n{compose.logs()}"
        assert len(state["history"]) == 2
        names = {w["name"] for w in client.workers()}
        assert names >= set(workers)

    status = subprocess.run(
        [sys.executable, "-m", "fedpilot.cli", "status", job_id, "--api", api, "--json"],
        capture_output=True,
        text=True,
        env=submit_env,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    assert yaml.safe_load(status.stdout)["state"] == "done"

    # What Prometheus would scrape (deploy/prometheus/prometheus.yml), remapped.
    import ssl

    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    scraped = 0
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, port = target.split(":")
                if host not in compose.services:
                    continue  # a profile that is not running (worker-gpu)
                scheme = job.get("scheme", "http")
                url = f"{scheme}://127.0.0.1:{compose.port(host, int(port))}{job['metrics_path']}"
                verify: ssl.SSLContext | bool = True
                if "tls_config" in job:
                    cafile = compose.remap_paths("prometheus", job["tls_config"]["ca_file"])
                    verify = ssl.create_default_context(cafile=cafile)
                headers = {}
                if "authorization" in job:  # the token file holds the compose token
                    headers["Authorization"] = f"Bearer {token}"
                response = httpx.get(url, timeout=10, verify=verify, headers=headers)
                assert response.status_code == 200, url
                assert "# TYPE" in response.text, url
                scraped += 1
    assert scraped == 1 + len(workers)
