"""Worker fixtures: the tiny random BERT of tests/models.py, and a stand-in coordinator."""

from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from peft import PeftModel

from fedpilot.v1 import coordinator_pb2_grpc
from fedpilot.worker.client import CoordinatorClient
from fedpilot.worker.model import ModelSpec, load_model
from tests.models import TINY_LABELS


@pytest.fixture
def tiny_spec(tiny_dir: Path) -> ModelSpec:
    return ModelSpec(
        model_path=str(tiny_dir),
        num_labels=TINY_LABELS,
        lora_rank=4,
        lora_alpha=8.0,
        max_seq_len=32,
        batch_size=8,
    )


@pytest.fixture
def tiny_model(tiny_spec: ModelSpec) -> PeftModel:
    return load_model(tiny_spec)


@pytest.fixture()
def serve() -> Iterator[Callable[..., CoordinatorClient]]:
    """``serve(servicer, timeout_s=10)``: the servicer on a real gRPC server over loopback,
    and a :class:`CoordinatorClient` of it. For behaviour the current coordinator cannot
    be made to show on demand (an earlier release's rules, a shedding gRPC core)."""
    servers: list[grpc.Server] = []

    def start(
        servicer: coordinator_pb2_grpc.CoordinatorServicer, timeout_s: float = 10
    ) -> CoordinatorClient:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return CoordinatorClient(f"127.0.0.1:{port}", timeout_s=timeout_s)

    yield start
    for server in servers:
        server.stop(0)
