#!/usr/bin/env bash
# Regenerate the Python stubs in proto/pdserve_pb/ from the .proto sources.
# Pinned to grpcio-tools 1.84.0 so the stubs also import under the GPU machine's grpcio 1.84
# (stubs refuse a runtime older than the generator). The stubs are committed.
set -euo pipefail
cd "$(dirname "$0")"
out=pdserve_pb
python -m grpc_tools.protoc -I . --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
    pdserve/v1/*.proto
# protoc writes `from pdserve.v1 import x_pb2`; make the imports package-relative so our
# stubs can never be shadowed by another top-level `pdserve` or `proto` module.
find "$out" -name '*.py' -exec sed -i -E 's/^from pdserve\.v1 import/from proto.pdserve_pb.pdserve.v1 import/' {} +
for d in "$out" "$out/pdserve" "$out/pdserve/v1"; do touch "$d/__init__.py"; done
