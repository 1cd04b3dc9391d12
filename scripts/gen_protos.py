"""Regenerates kvmesh/v1/*_pb2.py, *_pb2_grpc.py and *.pyi from protos/kvmesh/v1/*.proto.

The proto tree mirrors the Python package, so generated absolute imports
(`from kvmesh.v1 import common_pb2`) work without rewriting.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT


def main() -> int:
    import grpc_tools

    includes = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "kvmesh" / "v1").glob("*.proto"))
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{includes}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *protos,
    ]
    rc = protoc.main(args)
    if rc != 0:
        print("protoc failed", file=sys.stderr)
        return int(rc)
    init = OUT / "kvmesh" / "v1" / "__init__.py"
    init.write_text('"""Generated gRPC stubs for the kvmesh.v1 proto package (`make protos`)."""\n')
    return 0


if __name__ == "__main__":
    sys.exit(main())
