"""Readers for the deployment files: compose, kustomize renders, Dockerfiles, .dockerignore.

Everything here works offline: the Compose schema comes from the installed
``check-jsonschema`` package, Kubernetes schemas from ``kubernetes-validate``,
and kustomizations are rendered by the local ``kustomize`` or ``kubectl``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
PROMETHEUS_FILE = REPO / "deploy" / "prometheus" / "prometheus.yml"
K8S = REPO / "deploy" / "k8s"
K8S_TARGETS = (
    "base",
    "overlays/mixed-gpu",
    "overlays/managed-db",
    "overlays/monitoring",
    "overlays/external-workers",
)
SECRETS = {
    "fedpilot-secrets": {"api-token", "enrollment-secret", "postgres-password", "database-url"},
    "fedpilot-tls": {"ca.pem", "server.pem", "server-key.pem"},
    "fedpilot-tls-ca": {"ca.pem"},
}
"""The Secrets the manifests read, none of them applied by kustomize: the first is
created by the operator (deploy/README.md), the TLS ones by the certificate Job."""
DOCKERFILES = sorted((REPO / "deploy" / "images").glob("*.Dockerfile"))
K8S_VERSION = "1.32.0"
"""Oldest Kubernetes the manifests are validated against (StatefulSet ordinals are GA in 1.31)."""


# ---------------------------------------------------------------- compose


_INTERP = re.compile(
    r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})"
)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose variable interpolation (``${V}``, ``${V:-d}``, ``${V-d}``, ``${V:?e}``, ``$$``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg")
        current = env.get(name)
        unset = not current if op in (":-", ":?") else current is None
        if not unset:
            return str(current)
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise ValueError(f"required variable {name} is not set: {arg}")
        return ""

    return _INTERP.sub(sub, value)


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml with ``x-`` anchors merged and variables interpolated."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return interpolate(raw, {} if env is None else env)


def compose_schema() -> dict[str, Any]:
    """The Compose Specification JSON schema vendored by the check-jsonschema package."""
    ref = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    schema: dict[str, Any] = json.loads(ref.read_text(encoding="utf-8"))
    return schema


def service_argv(service: Mapping[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def shell_commands(argv: list[str]) -> list[list[str]]:
    """The simple commands of an ``sh -c SCRIPT`` argv (split at ``&&``, ``||``, ``;``)."""
    if argv[:2] != ["sh", "-c"] or len(argv) != 3:
        return []
    commands: list[list[str]] = [[]]
    for word in shlex.split(argv[2]):
        if word in ("&&", "||", ";"):
            commands.append([])
        else:
            commands[-1].append(word)
    return [c for c in commands if c]


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment", {}) or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def option(argv: list[str], flag: str) -> str | None:
    """The value of ``--flag VALUE`` or ``--flag=VALUE`` (last one wins), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


# ---------------------------------------------------------------- kubernetes


def kustomize_command() -> list[str] | None:
    if path := shutil.which("kustomize"):
        return [path, "build"]
    if path := shutil.which("kubectl"):
        return [path, "kustomize"]
    return None


def render(target: str) -> list[dict[str, Any]]:
    command = kustomize_command()
    assert command is not None, "no kustomize or kubectl on PATH"
    out = subprocess.run(
        [*command, str(K8S / target)], capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, f"kustomize build {target} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def pod_spec(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return spec
    return None


def containers(doc: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(doc)
    if spec is None:
        return
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


_K8S_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def secrets_of(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Secret name -> its string data (base64 ``data`` decoded)."""
    import base64

    found = {}
    for doc in docs:
        if doc["kind"] == "Secret":
            values = {k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()}
            values.update(doc.get("stringData", {}))
            found[doc["metadata"]["name"]] = values
    return found


def k8s_env(
    doc: Mapping[str, Any],
    container: Mapping[str, Any],
    secrets: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, str]:
    """Container env as the first pod would see it (field and secret refs resolved)."""
    start = (doc["spec"].get("ordinals") or {}).get("start", 0)
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        source = var.get("valueFrom", {})
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            if path == "metadata.name":
                env[var["name"]] = f"{doc['metadata']['name']}-{start}"
            elif path == "metadata.labels['apps.kubernetes.io/pod-index']":
                env[var["name"]] = str(start)
            else:
                env[var["name"]] = f"<{path}>"
        elif "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            value = (secrets or {}).get(ref["name"], {}).get(ref["key"])
            env[var["name"]] = f"<secret {ref['name']}/{ref['key']}>" if value is None else value
        else:
            env[var["name"]] = "<unresolved>"
    return env


def k8s_argv(container: Mapping[str, Any], env: Mapping[str, str]) -> tuple[list[str], set[str]]:
    """command + args with ``$(VAR)`` expanded like the kubelet; also the undefined refs."""
    missing: set[str] = set()

    def expand(text: str) -> str:
        def sub(m: re.Match[str]) -> str:
            if m.group(1) in env:
                return env[m.group(1)]
            missing.add(m.group(1))
            return m.group(0)

        return _K8S_REF.sub(sub, text)

    argv = [expand(str(a)) for a in [*container.get("command", []), *container.get("args", [])]]
    return argv, missing


# ---------------------------------------------------------------- Dockerfiles


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: comments dropped, continuation lines joined, and
    ``FROM ${ARG}`` resolved with the defaults of the ARGs before the first FROM."""
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, args = text.partition(" ")
        instruction = Instruction(keyword.upper(), args.strip(), start)
        if instruction.keyword == "ARG" and not stages:
            name, _, default = instruction.args.partition("=")
            global_args[name.strip()] = default.strip()
        if instruction.keyword == "FROM":
            words = _INTERP.sub(
                lambda m: global_args.get(m.group("name") or "", m.group(0)), instruction.args
            ).split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(instruction)
    return stages


def exec_form(args: str) -> list[str] | None:
    """``["a", "b"]`` of CMD/ENTRYPOINT/HEALTHCHECK CMD, or None for the shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


# ---------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    for piece in re.split(r"(\*\*/?)", pattern):
        if piece in ("**", "**/"):
            parts.append(".*" if piece == "**" else "(?:.*/)?")
        else:
            parts.append(fnmatch.translate(piece).removeprefix("(?s:").removesuffix(")\\Z"))
    return re.compile("(?s:" + "".join(parts) + r")\Z")


def dockerignore_excludes(ignore_file: Path, path: str) -> bool:
    """Whether ``path`` (relative to the context) is left out of the build context.

    Docker's rules: patterns are matched in order and the last match wins; a
    pattern matching a parent directory matches everything under it; ``!``
    re-includes.
    """
    excluded = False
    lines = [ln.strip() for ln in ignore_file.read_text().splitlines()]
    prefixes = []
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        prefixes.append("/".join(parts[:i]))
    for line in lines:
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = _pattern_regex(pattern)
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return excluded
