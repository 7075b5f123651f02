"""Generated protobuf/gRPC stubs of pdserve's `.proto` files (sources in `proto/`).

`from pdserve_proto import pb, pb_grpc` (serving API) and
`from pdserve_proto import kv_pb, kv_pb_grpc` (KV transfer). Regenerate with
`bash proto/generate.sh`.
"""

from pdserve_proto.stubs.pdserve.v1 import kv_transfer_pb2 as kv_pb
from pdserve_proto.stubs.pdserve.v1 import kv_transfer_pb2_grpc as kv_pb_grpc
from pdserve_proto.stubs.pdserve.v1 import serving_pb2 as pb
from pdserve_proto.stubs.pdserve.v1 import serving_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc", "kv_pb", "kv_pb_grpc"]
