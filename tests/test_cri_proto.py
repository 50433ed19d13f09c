"""The checked-in CRI stubs are exactly what the vendored api.proto compiles to (no hand edits, no drift)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "tapio/receivers/cri/_proto/api.proto"


def test_checked_in_stubs_match_the_proto(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", PROTO],
        cwd=ROOT, check=True, capture_output=True,
    )
    for name in ("api_pb2.py", "api_pb2_grpc.py"):
        generated = (tmp_path / "tapio/receivers/cri/_proto" / name).read_text()
        checked_in = (ROOT / "tapio/receivers/cri/_proto" / name).read_text()
        assert generated == checked_in, f"{name} differs from what {PROTO} compiles to: run scripts/gen-cri-proto.sh"


def test_the_stubs_import_and_name_the_runtime_service():
    from tapio.receivers.cri._proto import api_pb2, api_pb2_grpc

    assert api_pb2.DESCRIPTOR.package == "runtime.v1"
    assert "GetContainerEvents" in api_pb2.DESCRIPTOR.services_by_name["RuntimeService"].methods_by_name
    assert hasattr(api_pb2_grpc, "RuntimeServiceStub")
