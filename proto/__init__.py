"""pdserve's `.proto` sources (this folder) and their generated protobuf/gRPC stubs.

`from pdserve.proto import pb, pb_grpc` (serving API) and
`from pdserve.proto import kv_pb, kv_pb_grpc` (KV transfer). Regenerate with
`bash proto/generate.sh`. The stubs live under `pdserve.proto.stubs`, never in a top-level
`proto` package: proto-plus (pulled in by ray[default]) installs a top-level `proto`.
"""

from pdserve.proto.stubs.pdserve.v1 import kv_transfer_pb2 as kv_pb
from pdserve.proto.stubs.pdserve.v1 import kv_transfer_pb2_grpc as kv_pb_grpc
from pdserve.proto.stubs.pdserve.v1 import serving_pb2 as pb
from pdserve.proto.stubs.pdserve.v1 import serving_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc", "kv_pb", "kv_pb_grpc"]
