"""Schemathesis over the live coordinator's /openapi.json: no 5xx, documented statuses and
bodies, and every job the fuzzer managed to submit is one the round driver can run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from fedpilot.coordinator.jobspec import JobSpec
from tests.api.conftest import TOKEN, Api


def test_schemathesis_finds_no_server_errors(api: Api, tmp_path: Path) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st is not None, "schemathesis is a dev dependency; `make install` installs it"
    result = subprocess.run(
        [
            st,
            "run",
            f"{api.url}/openapi.json",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--checks",
            "not_a_server_error,status_code_conformance,response_schema_conformance,"
            "content_type_conformance",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "40",
            "--workers",
            "1",
            "--seed",
            "20261124",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert "passed" in result.stdout
    jobs = api.coordinator.store.jobs()
    assert jobs, "the fuzzer should have submitted valid jobs"
    for job in jobs:  # what the API accepted must stay valid when read back
        JobSpec.model_validate(job.spec)
        assert job.error is None or "ValidationError" not in job.error, job.error
