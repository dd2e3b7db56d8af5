"""A small client of the coordinator's REST API (used by `fedpilot submit/jobs/status/adapter`)."""

from __future__ import annotations

import io
import json
import os
import ssl
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

DEFAULT_URL = "http://127.0.0.1:8080"
TERMINAL = ("done", "failed", "cancelled")


class ApiError(Exception):
    """A refused request, with the server's explanation (field errors of a 422 included)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _explain(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason_phrase
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI validation errors: name each field
        lines = []
        for err in detail:
            loc = ".".join(str(p) for p in err.get("loc", []) if p != "body")
            lines.append(f"{loc or '(spec)'}: {err.get('msg', err)}")
        return "; ".join(lines)
    return str(detail)


def load_spec(path: Path) -> dict[str, Any]:
    """A job spec from YAML or JSON (YAML is a superset; the extension does not matter)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read job spec: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a job spec is a mapping of fields, got {type(data).__name__}")
    return data


class ApiClient:
    def __init__(
        self, url: str = DEFAULT_URL, token: str = "", timeout: float = 30.0, ca: str = ""
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        ca = ca or os.environ.get("FEDPILOT_API_CA", "")  # trust a private CA (https)
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca) if ca else True
        self.http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout, verify=verify
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ApiError(0, f"cannot reach {self.http.base_url}: {e}") from e
        if response.status_code >= 400:
            raise ApiError(response.status_code, _explain(response))
        return response

    def submit(self, spec: Mapping[str, Any]) -> str:
        job_id: str = self._call("POST", "/api/v1/jobs", json=dict(spec)).json()["id"]
        return job_id

    def jobs(self) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self._call("GET", "/api/v1/jobs").json()
        return jobs

    def job(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._call("GET", f"/api/v1/jobs/{job_id}").json()
        return job

    def round(self, job_id: str, number: int) -> dict[str, Any]:
        rnd: dict[str, Any] = self._call("GET", f"/api/v1/jobs/{job_id}/rounds/{number}").json()
        return rnd

    def cancel(self, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._call("POST", f"/api/v1/jobs/{job_id}/cancel").json()
        return job

    def workers(self) -> list[dict[str, Any]]:
        workers: list[dict[str, Any]] = self._call("GET", "/api/v1/workers").json()
        return workers

    def adapter(self, job_id: str, out_dir: Path, version: int | None = None) -> int:
        """Download the global adapter and unpack it into ``out_dir``; returns its version."""
        params = {"version": version} if version is not None else {}
        response = self._call("GET", f"/api/v1/jobs/{job_id}/adapter", params=params)
        out_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(response.content)) as zf:
            for name in zf.namelist():
                target = (out_dir / name).resolve()
                if out_dir.resolve() not in target.parents:
                    raise ApiError(0, f"refusing archive member outside {out_dir}: {name!r}")
            zf.extractall(out_dir)
        return int(response.headers.get("X-Fedpilot-Adapter-Version", "-1"))


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)
