"""The checked-in gRPC stubs are exactly what `make proto` generates from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "proto" / "wmpo" / "v1"


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "wmpo" / "v1").iterdir()}
    checked_in = {
        p.name: p.read_bytes()
        for p in GENERATED.iterdir()
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"))
    }
    assert sorted(fresh) == sorted(checked_in), "stub files differ: run `make proto` and commit"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale generated stubs {stale}: run `make proto` and commit"


def test_every_rpc_documents_its_error_codes() -> None:
    from wmpo.v1 import imagination_pb2, policy_pb2

    for module, proto in ((policy_pb2, "policy.proto"), (imagination_pb2, "imagination.proto")):
        text = (GENERATED / proto).read_text()
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                block = text.split(f"rpc {method.name}(")[0].rsplit("rpc ", 1)[-1]
                assert "Errors" in block or "UNAUTHENTICATED" in block, f"{service.name}.{method.name}"
