"""The wire contract: committed stubs match the .proto, and the contract keeps its promises."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from federation import proto_build, tls, wire
from federation.proto_gen.condi.v1 import federation_pb2 as pb
from federation.proto_gen.condi.v1 import federation_pb2_grpc as pb_grpc

PROTO = proto_build.PROTO_ROOT / "condi" / "v1" / "federation.proto"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _copy_stubs(dst: Path) -> Path:
    shutil.copytree(proto_build.STUB_ROOT, dst, ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    proto_build.generate(tmp_path / "gen")
    fresh = _tree(tmp_path / "gen")
    committed = _tree(proto_build.STUB_ROOT)
    hint = "stubs are stale: run `python -m federation.proto_build` and commit federation/proto_gen"
    assert sorted(fresh) == sorted(committed), hint
    assert "condi/v1/federation_pb2_grpc.py" in fresh
    for name, content in fresh.items():
        assert content == committed[name], f"{name}: {hint}"


def test_compare_and_check_report_every_kind_of_drift(tmp_path: Path) -> None:
    stubs = _copy_stubs(tmp_path / "stubs")
    assert proto_build.compare(stubs) == []
    assert proto_build.main(["--check", "--out", str(stubs)]) == 0
    grpc_stub = stubs / "condi" / "v1" / "federation_pb2_grpc.py"
    grpc_stub.write_bytes(grpc_stub.read_bytes() + b"\n")
    (stubs / "condi" / "v1" / "federation_pb2.pyi").unlink()
    (stubs / "condi" / "v1" / "old_pb2.py").write_text("")
    problems = proto_build.compare(stubs)
    assert problems == [
        f"{stubs}/condi/v1/federation_pb2.pyi: missing",
        f"{stubs}/condi/v1/old_pb2.py: not generated from any .proto",
        f"{stubs}/condi/v1/federation_pb2_grpc.py: differs from the generated file",
    ]
    assert proto_build.main(["--check", "--out", str(stubs)]) == 1
    assert proto_build.main(["--out", str(stubs)]) == 0
    assert proto_build.compare(stubs) == []


def test_imports_between_proto_packages_become_relative(tmp_path: Path) -> None:
    protos = tmp_path / "proto"
    (protos / "condi" / "common").mkdir(parents=True)
    (protos / "condi" / "v9").mkdir(parents=True)
    (protos / "condi" / "common" / "shared.proto").write_text(
        'syntax = "proto3";\npackage condi.common;\nmessage Shared { string text = 1; }\n'
    )
    (protos / "condi" / "v9" / "api.proto").write_text(
        'syntax = "proto3";\npackage condi.v9;\nimport "condi/common/shared.proto";\n'
        "message Req { condi.common.Shared shared = 1; }\n"
        "service Api { rpc Call(Req) returns (condi.common.Shared); }\n"
    )
    out = tmp_path / "site" / "gen"
    proto_build.generate(out, protos)
    api = (out / "condi" / "v9" / "api_pb2.py").read_text()
    grpc_api = (out / "condi" / "v9" / "api_pb2_grpc.py").read_text()
    assert "from ..common import shared_pb2 as condi_dot_common_dot_shared__pb2" in api
    assert "from . import api_pb2 as condi_dot_v9_dot_api__pb2" in grpc_api
    assert "from ..common import shared_pb2 as condi_dot_common_dot_shared__pb2" in grpc_api
    # A fresh interpreter, so these throwaway messages never enter this process's descriptor pool.
    code = (
        "from gen.condi.v9 import api_pb2, api_pb2_grpc\n"
        "print(api_pb2.Req(shared={'text': 'ok'}).shared.text)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path / "site", capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_missing_sources_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(proto_build.ProtoBuildError, match=r"no \.proto files"):
        proto_build.render(tmp_path)
    assert proto_build.main(["--proto-root", str(tmp_path), "--out", str(tmp_path / "out")]) == 2


def test_service_methods_and_streaming_kinds() -> None:
    service = pb.DESCRIPTOR.services_by_name["Federation"]
    assert service.full_name == "condi.v1.Federation"
    kinds = {
        m.name: (m.client_streaming, m.server_streaming, m.input_type.name, m.output_type.name)
        for m in service.methods
    }
    assert kinds == {
        "Join": (False, False, "JoinRequest", "JoinReply"),
        "GetTask": (False, False, "TaskRequest", "Task"),
        "DownloadState": (False, True, "DownloadRequest", "StatePart"),
        "UploadUpdate": (True, False, "UpdatePart", "UploadReceipt"),
        "AdvertiseKeys": (False, False, "AdvertiseKeysRequest", "Receipt"),
        "ShareKeys": (False, False, "ShareKeysRequest", "Receipt"),
        "Unmask": (False, False, "UnmaskRequest", "Receipt"),
        "ReportMetrics": (False, False, "MetricsReport", "Receipt"),
        "Heartbeat": (False, False, "HeartbeatRequest", "HeartbeatReply"),
    }
    assert hasattr(pb_grpc, "FederationStub") and hasattr(pb_grpc, "add_FederationServicer_to_server")


def test_every_request_after_join_names_its_round_and_stage() -> None:
    service = pb.DESCRIPTOR.services_by_name["Federation"]
    for method in service.methods:
        if method.name == "Join":
            continue
        request = method.input_type
        if method.client_streaming:
            # The stream's first message (the header) carries the reference for the whole stream.
            request = request.fields_by_name["header"].message_type
        ref = request.fields_by_name.get("ref")
        assert ref is not None, f"{method.name}: request {request.name} has no ref"
        assert ref.message_type.full_name == "condi.v1.StageRef", method.name
    assert [f.name for f in pb.StageRef.DESCRIPTOR.fields] == ["run_id", "round", "attempt", "stage"]


def test_no_request_field_names_the_caller() -> None:
    # Silo ids in requests only ever name other silos; the caller is its certificate.
    service = pb.DESCRIPTOR.services_by_name["Federation"]
    seen: set[str] = set()

    def walk(message: object) -> None:
        if message.full_name in seen:
            return
        seen.add(message.full_name)
        for field in message.fields:
            assert field.name not in {"silo_id", "sender", "from_silo", "caller"}, (
                f"{message.name}.{field.name}"
            )
            if field.message_type is not None:
                walk(field.message_type)

    for method in service.methods:
        walk(method.input_type)
    assert "condi.v1.OutgoingShare" in seen and "condi.v1.RevealedShare" in seen


def test_chunk_message_mirrors_the_wire_format() -> None:
    assert [f.name for f in pb.Chunk.DESCRIPTOR.fields] == [f.name for f in dataclasses.fields(wire.Chunk)]
    encoded = wire.encode_state({"x": np.arange(10, dtype=np.float32)})
    assembler = wire.Reassembler(max_payload_bytes=encoded.manifest.payload_bytes)
    for piece in wire.chunk(encoded, 16):
        message = pb.StatePart(chunk=pb.Chunk(**dataclasses.asdict(piece)))
        back = pb.StatePart.FromString(message.SerializeToString()).chunk
        assembler.add(wire.Chunk(**{f.name: getattr(back, f.name) for f in dataclasses.fields(wire.Chunk)}))
    assert assembler.payload() == encoded.payload


def test_a_full_chunk_fits_one_message() -> None:
    chunk = pb.Chunk(
        index=2**31,
        total=2**31,
        data=b"\xff" * tls.DEFAULT_CHUNK_BYTES,
        sha256="f" * 64,
        payload_sha256="f" * 64,
    )
    assert pb.UpdatePart(chunk=chunk).ByteSize() < tls.MAX_MESSAGE_BYTES
    assert pb.StatePart(chunk=chunk).ByteSize() < tls.MAX_MESSAGE_BYTES


def test_every_element_of_the_contract_is_documented(tmp_path: Path) -> None:
    out = tmp_path / "federation.desc"
    status = protoc.main(
        [
            "protoc",
            f"--proto_path={proto_build.PROTO_ROOT}",
            f"--descriptor_set_out={out}",
            "--include_source_info",
            str(PROTO),
        ]
    )
    assert status == 0
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (proto,) = files.file
    documented = {tuple(loc.path) for loc in proto.source_code_info.location if loc.leading_comments.strip()}
    # Descriptor paths: 4 message, 2 field, 8 oneof, 5 enum, 2 value, 6 service, 2 method.
    wanted: dict[tuple[int, ...], str] = {}
    for i, message in enumerate(proto.message_type):
        wanted[(4, i)] = message.name
        wanted.update({(4, i, 2, j): f"{message.name}.{f.name}" for j, f in enumerate(message.field)})
        wanted.update({(4, i, 8, j): f"{message.name}.{o.name}" for j, o in enumerate(message.oneof_decl)})
    for i, enum in enumerate(proto.enum_type):
        wanted[(5, i)] = enum.name
        wanted.update({(5, i, 2, j): f"{enum.name}.{v.name}" for j, v in enumerate(enum.value)})
    for i, service in enumerate(proto.service):
        wanted[(6, i)] = service.name
        wanted.update({(6, i, 2, j): f"{service.name}.{m.name}" for j, m in enumerate(service.method)})
    undocumented = sorted(name for path, name in wanted.items() if path not in documented)
    assert len(wanted) > 150
    assert undocumented == []
