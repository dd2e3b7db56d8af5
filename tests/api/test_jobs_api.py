"""The REST API against a real coordinator on PostgreSQL: submit, inspect, cancel, refusals."""

from __future__ import annotations

import logging

import pytest

from fedpilot.coordinator.db.models import Job
from tests.api.conftest import TOKEN, Api

GOOD = {"name": "api-job", "rounds": 3, "labels": ["a", "b", "c"], "strategy": "fedpilot"}


def test_submit_list_get_and_cancel(api: Api) -> None:
    created = api.http.post("/api/v1/jobs", json=GOOD)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]

    listed = api.http.get("/api/v1/jobs").json()
    assert [j["id"] for j in listed] == [job_id]
    job = api.http.get(f"/api/v1/jobs/{job_id}").json()
    assert job["state"] == "waiting"
    assert job["rounds"] == 3 and job["spec"]["num_labels"] == 3  # derived from labels
    assert job["history"] == [] and job["adapter_version"] is None

    cancelled = api.http.post(f"/api/v1/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    again = api.http.post(f"/api/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409 and "already ended" in again.json()["detail"]
    # The round driver must not revive a cancelled job.
    assert api.coordinator.store.job(job_id).state == "cancelled"
    assert api.http.get("/api/v1/jobs", params={"state": "cancelled"}).json()[0]["id"] == job_id


def test_unknown_job_and_round_are_404_and_bad_ids_422(api: Api) -> None:
    unknown = "00000000-0000-0000-0000-000000000000"
    assert api.http.get(f"/api/v1/jobs/{unknown}").status_code == 404
    assert api.http.post(f"/api/v1/jobs/{unknown}/cancel").status_code == 404
    assert api.http.get(f"/api/v1/jobs/{unknown}/adapter").status_code == 404
    job_id = api.http.post("/api/v1/jobs", json=GOOD).json()["id"]
    missing = api.http.get(f"/api/v1/jobs/{job_id}/rounds/1")
    assert missing.status_code == 404 and "no round 1" in missing.json()["detail"]
    no_adapter = api.http.get(f"/api/v1/jobs/{job_id}/adapter")
    assert no_adapter.status_code == 404 and "no adapter version" in no_adapter.json()["detail"]
    for bad in ("not-a-uuid", "x" * 300, "%00"):
        assert api.http.get(f"/api/v1/jobs/{bad}").status_code == 422
    assert api.http.get(f"/api/v1/jobs/{job_id}/rounds/0").status_code == 422
    assert api.http.get(f"/api/v1/jobs/{job_id}/rounds/99999999999").status_code == 422


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"rounds": -1}, "rounds"),
        ({"rounds": 0}, "rounds"),
        ({"participants": 10**9}, "participants"),
        ({"min_workers": 10**9}, "min_workers"),
        ({"lora": {"rank": 0}}, "lora.rank"),
        ({"lora": {"rank": 100_000}}, "lora.rank"),
        ({"learning_rate": -0.1}, "learning_rate"),
        ({"quorum": 1.5}, "quorum"),
        ({"strategy": "magic"}, "strategy"),
        ({"aggregation": {"rule": "median"}}, "aggregation.rule"),
        ({"batch_size": "many"}, "batch_size"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"labels": ["a", "a"]}, "labels must be distinct"),
    ],
)
def test_bad_specs_get_422_naming_the_field_and_store_nothing(api: Api, patch, field) -> None:
    response = api.http.post("/api/v1/jobs", json={**GOOD, **patch})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    named = {".".join(str(p) for p in e["loc"] if p != "body") for e in detail}
    messages = " ".join(e["msg"] for e in detail)
    assert field in named or field in messages, detail
    assert api.coordinator.store.count(Job) == 0


def test_refused_specs_are_counted(api: Api) -> None:
    from prometheus_client import REGISTRY

    def count() -> float:
        return (
            REGISTRY.get_sample_value(
                "fedpilot_rejections_total", {"reason": "api_invalid_request"}
            )
            or 0.0
        )

    before = count()
    for patch in ({"rounds": -1}, {"participants": 10**9}, {"lora": {"rank": 10**6}}):
        assert api.http.post("/api/v1/jobs", json={**GOOD, **patch}).status_code == 422
    assert count() == before + 3


def test_specs_impossible_for_the_model_are_422(api: Api, tiny_dir) -> None:
    """Checked against the model's config.json: the bundled MiniLM (hidden 384, 512
    positions) and a local model directory."""
    cases = [
        ({"lora": {"rank": 400}}, "lora.rank", "hidden size 384"),
        ({"max_seq_len": 1024}, "max_seq_len", "512 positions"),
        ({"model": str(tiny_dir), "lora": {"rank": 500}}, "lora.rank", "hidden size"),
    ]
    for patch, field, why in cases:
        r = api.http.post("/api/v1/jobs", json={**GOOD, **patch})
        assert r.status_code == 422, r.text
        (error,) = r.json()["detail"]
        assert ".".join(error["loc"][1:]) == field and why in error["msg"]
    assert api.coordinator.store.count(Job) == 0
    assert api.http.post("/api/v1/jobs", json={**GOOD, "lora": {"rank": 64}}).status_code == 201


def test_malformed_bodies_are_422(api: Api) -> None:
    for body, ctype in [(b"{not json", "application/json"), (b"[]", "application/json")]:
        r = api.http.post("/api/v1/jobs", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 422, r.text
    assert api.coordinator.store.count(Job) == 0


def test_every_job_endpoint_refuses_without_the_token(api: Api, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    job_id = api.http.post("/api/v1/jobs", json=GOOD).json()["id"]
    calls = [
        ("POST", "/api/v1/jobs"),
        ("GET", "/api/v1/jobs"),
        ("GET", f"/api/v1/jobs/{job_id}"),
        ("POST", f"/api/v1/jobs/{job_id}/cancel"),
        ("GET", f"/api/v1/jobs/{job_id}/rounds/1"),
        ("GET", f"/api/v1/jobs/{job_id}/adapter"),
        ("GET", "/api/v1/workers"),
    ]
    for method, path in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = api.anonymous.request(method, path, headers=headers, json=GOOD)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
    assert api.coordinator.store.count(Job) == 1
    assert api.coordinator.store.job(job_id).state == "waiting"
    # Probes stay open; /metrics (worker budgets, job ids) needs the token like the API.
    for path in ("/healthz", "/readyz"):
        assert api.anonymous.get(path).status_code == 200
    assert api.anonymous.get("/metrics").status_code == 401
    assert api.http.get("/metrics").status_code == 200
    assert TOKEN not in caplog.text


def test_readyz_reports_a_schema_behind_the_code(api: Api) -> None:
    from sqlalchemy import text

    ready = api.anonymous.get("/readyz")
    assert ready.status_code == 200 and ready.json()["migrations_current"] is True
    engine = api.coordinator.store.engine
    with engine.begin() as conn:
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        conn.execute(text("UPDATE alembic_version SET version_num = 'older'"))
    try:
        stale = api.anonymous.get("/readyz")
        assert stale.status_code == 503
        body = stale.json()
        assert {k: body[k] for k in ("database", "migrations_current", "revision")} == {
            "database": True,
            "migrations_current": False,
            "revision": "older",
        }
        assert body["driver_running"] is True
    finally:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})


def test_openapi_documents_the_api(api: Api) -> None:
    spec = api.anonymous.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {
        "/api/v1/jobs",
        "/api/v1/jobs/{job_id}",
        "/api/v1/jobs/{job_id}/cancel",
        "/api/v1/jobs/{job_id}/rounds/{number}",
        "/api/v1/jobs/{job_id}/adapter",
        "/api/v1/workers",
        "/healthz",
        "/readyz",
    } <= paths
    assert api.anonymous.get("/docs").status_code == 200
