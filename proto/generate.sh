#!/usr/bin/env bash
# Regenerate the Python stubs (proto/stubs/, imported as pdserve.proto.stubs) from the
# .proto sources in proto/. Pinned to grpcio-tools 1.84.0 so the stubs also import under
# the GPU machine's grpcio 1.84 (stubs refuse a runtime older than the generator). The
# stubs are committed.
#
# They are imported only as `pdserve.proto...`, never as a top-level `proto` package: the
# PyPI package proto-plus (pulled in by ray[default]) installs a top-level `proto` module.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/proto/stubs"
mkdir -p "$out"
cd "$root/proto"
python -m grpc_tools.protoc -I . --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
    pdserve/v1/*.proto
# protoc writes `from pdserve.v1 import x_pb2`; make the imports absolute within our package.
find "$out" -name '*.py' -exec sed -i -E \
    's/^from pdserve\.v1 import/from pdserve.proto.stubs.pdserve.v1 import/' {} +
for d in "$out" "$out/pdserve" "$out/pdserve/v1"; do touch "$d/__init__.py"; done
