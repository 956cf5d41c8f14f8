"""Regenerate the committed gRPC stubs from inference.proto.

    python -m jaxserve.server.gen_protos          # from the repository root

runs grpc_tools' bundled protoc as

    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
        jaxserve/server/inference.proto

The proto is compiled relative to the repository root so the generated `_pb2_grpc` imports
`jaxserve.server.inference_pb2` by its package path. The generated `_pb2.py` checks at import
that the protobuf runtime is not older than the protoc that wrote it (grpcio-tools pins a
matching protobuf, so regenerate after upgrading grpcio-tools, never with a newer one than the
deployed protobuf).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO = "jaxserve/server/inference.proto"


def main() -> int:
    from grpc_tools import protoc

    args = ["grpc_tools.protoc", "-I", str(ROOT), f"--python_out={ROOT}", f"--pyi_out={ROOT}",
            f"--grpc_python_out={ROOT}", str(ROOT / PROTO)]
    rc = protoc.main(args)
    if rc != 0:
        print(f"protoc failed with exit code {rc}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
