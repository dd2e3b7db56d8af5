import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_the_proto_files() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_contract_is_versioned() -> None:
    from fedpilot.v1 import coordinator_pb2

    assert coordinator_pb2.DESCRIPTOR.package == "fedpilot.v1"
    service = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"]
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods["DownloadAdapter"] == (False, True)
    assert methods["UploadUpdate"] == (True, False)
