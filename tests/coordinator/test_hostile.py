"""Hostile and broken input at the gRPC boundary: impersonation, registration floods,
malformed protobuf bytes and fuzzed upload manifests. Each gets a clear refusal, is
counted in a metric, and changes nothing stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from fedpilot.coordinator.db.models import Worker
from fedpilot.coordinator.server import RunningCoordinator, start
from fedpilot.coordinator.settings import CoordinatorSettings
from fedpilot.v1 import transfer_pb2
from fedpilot.wire import encode_tensors, error_detail_from_rpc_error
from fedpilot.worker.client import CoordinatorClient
from tests.coordinator.test_service import (  # noqa: F401 (fixtures)
    _manifest,
    _raw_upload,
    _reason,
    _tensors,
    round_ready,
    running,
)


def _rejections(reason: str) -> float:
    return REGISTRY.get_sample_value("fedpilot_rejections_total", {"reason": reason}) or 0.0


def test_a_worker_cannot_act_as_another(round_ready) -> None:  # noqa: F811
    store, victim, job_id, task = round_ready
    mallory = CoordinatorClient(victim.target)
    mallory.register("mallory", budget_bytes=1 << 40)
    good = _tensors(["head"])
    before = _rejections("ERROR_REASON_BAD_TOKEN")

    # Her own valid token with the victim's id: the token does not belong to that id.
    own_token = mallory._token
    mallory.authenticate(victim.worker_id, own_token)
    assert _reason(lambda: mallory.upload_update(_manifest(task), good)) == "ERROR_REASON_BAD_TOKEN"
    assert _reason(lambda: mallory.heartbeat()) == "ERROR_REASON_BAD_TOKEN"
    # Her own identity, the victim's task: not assigned to her.
    registered = {w.name: w.id for w in store.workers()}
    mallory.authenticate(registered["mallory"], own_token)
    assert (
        _reason(lambda: mallory.upload_update(_manifest(task), good))
        == "ERROR_REASON_NOT_ASSIGNED"
    )
    mallory.close()
    assert _rejections("ERROR_REASON_BAD_TOKEN") == before + 2
    assert store.updates(job_id, task.round) == []
    # The victim is unaffected.
    assert not victim.upload_update(_manifest(task), good).duplicate


@pytest.fixture()
def guarded(tmp_path: Path) -> Iterator[RunningCoordinator]:
    settings = CoordinatorSettings(
        data_dir=tmp_path, grpc_port=0, registrations_per_s=0.5, registration_burst=5
    )
    coordinator = start(settings)
    yield coordinator
    coordinator.stop(grace=0.2)


def test_a_registration_flood_is_rate_limited(guarded: RunningCoordinator) -> None:
    before = _rejections("ERROR_REASON_RATE_LIMITED")
    client = CoordinatorClient(f"127.0.0.1:{guarded.port}", timeout_s=5)
    outcomes = []
    for i in range(20):
        try:
            client.register(f"flood-{i}", budget_bytes=1)
            outcomes.append("ok")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            detail = error_detail_from_rpc_error(e)
            assert detail is not None and "too many registrations" in detail.message
            outcomes.append("limited")
    client.close()
    assert outcomes[:5] == ["ok"] * 5
    assert outcomes.count("ok") <= 6  # the burst, plus at most one refilled token
    assert guarded.store.count(Worker) == outcomes.count("ok")
    assert _rejections("ERROR_REASON_RATE_LIMITED") == before + outcomes.count("limited")


def test_malformed_protobuf_bytes_are_refused_and_counted(guarded: RunningCoordinator) -> None:
    before = _rejections("ERROR_REASON_MALFORMED")
    channel = grpc.insecure_channel(f"127.0.0.1:{guarded.port}")
    raw = channel.unary_unary(
        "/fedpilot.v1.Coordinator/Register",
        request_serializer=None,
        response_deserializer=None,
    )
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\x01abc", bytes(range(256))):
        with pytest.raises(grpc.RpcError) as e:
            raw(garbage, timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        detail = error_detail_from_rpc_error(e.value)
        assert detail is not None and "not a valid Register request" in detail.message
    channel.close()
    assert _rejections("ERROR_REASON_MALFORMED") == before + 3
    assert guarded.store.count(Worker) == 0
    # The server still serves well-formed requests.
    client = CoordinatorClient(f"127.0.0.1:{guarded.port}", timeout_s=5)
    assert client.register("after-garbage", budget_bytes=1).worker_id
    client.close()


_FIELDS = st.sampled_from(["total_bytes", "sha256", "shape", "dtype", "name", "drop", "extra"])


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    field=_FIELDS,
    number=st.integers(min_value=0, max_value=2**63 - 1),
    text=st.text(max_size=80),
    cut=st.integers(min_value=-64, max_value=64),
)
def test_fuzzed_manifests_and_payloads_are_refused_without_a_trace(
    round_ready,  # noqa: F811
    field: str, number: int, text: str, cut: int
) -> None:
    store, client, job_id, task = round_ready
    good = _tensors(["head"])
    data, honest = encode_tensors(good)
    payload = transfer_pb2.PayloadManifest()
    payload.CopyFrom(honest)
    specs = payload.tensors
    if field == "total_bytes":
        payload.total_bytes = number if number != honest.total_bytes else number + 1
    elif field == "sha256":
        payload.sha256 = text if text != honest.sha256 else text + "0"
    elif field == "shape":
        specs[number % len(specs)].shape.append(number % 7 + 2)
    elif field == "dtype":
        specs[number % len(specs)].dtype = number % 5 if number % 5 != specs[0].dtype else 0
    elif field == "name":
        specs[number % len(specs)].name = text if text not in good else text + "x"
    elif field == "drop":
        del specs[number % len(specs)]
    else:
        specs.add(name=f"head/{text}", shape=[1], dtype=specs[0].dtype)
    body = bytes(data)
    if cut > 0:
        body += bytes(cut)
    elif cut < 0:
        body = body[:cut]
    manifest = _manifest(task, payload=payload)
    with pytest.raises(grpc.RpcError) as e:
        _raw_upload(client, manifest, body, chunk=4096)
    detail = error_detail_from_rpc_error(e.value)
    assert detail is not None and detail.reason != 0 and detail.message
    assert store.updates(job_id, task.round) == []


def test_absurd_ids_and_numbers_get_clean_refusals(round_ready) -> None:  # noqa: F811
    """NUL bytes, overlong ids and numbers beyond the database's integers are answered with
    a reason, on PostgreSQL as on SQLite, never with an internal error."""
    store, client, job_id, task = round_ready
    good = _tensors(["head"])
    for bad_job in ("\x00" * 8, "j" * 500):
        assert (
            _reason(lambda bad_job=bad_job: client.download_adapter(bad_job, 0))
            == "ERROR_REASON_UNKNOWN_ADAPTER_VERSION"
        )
    assert (
        _reason(lambda: client.download_adapter(job_id, 2**40))
        == "ERROR_REASON_UNKNOWN_ADAPTER_VERSION"
    )
    for bad_task in ("\x00", "t" * 500):
        assert (
            _reason(
                lambda bad_task=bad_task: client.upload_update(
                    _manifest(task, task_id=bad_task), good
                )
            )
            == "ERROR_REASON_NOT_ASSIGNED"
        )
    assert (
        _reason(lambda: client.upload_update(_manifest(task, round=2**40), good))
        == "ERROR_REASON_WRONG_ROUND"
    )
    stranger = CoordinatorClient(client.target)
    for bad_worker in ("\x00", "w" * 500):
        stranger.authenticate(bad_worker, "token")
        assert _reason(stranger.heartbeat) in {
            "ERROR_REASON_BAD_TOKEN",
            "ERROR_REASON_UNKNOWN_WORKER",
        }
    stranger.close()
    assert store.updates(job_id, task.round) == []
