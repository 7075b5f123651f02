"""The generated serving-API stubs, imported from our own package only.

The PyPI package `proto-plus` installs a top-level module also named `proto`; if it shadows
ours, the import below fails loudly instead of silently using someone else's module.
"""

from __future__ import annotations

import os

import proto as _proto_pkg

if not os.path.exists(os.path.join(os.path.dirname(_proto_pkg.__file__), "pdserve", "v1")):
    raise ImportError(
        f"the module named 'proto' at {_proto_pkg.__file__} is not pdserve's; "
        "is proto-plus shadowing it? run from the pdserve checkout or install pdserve"
    )

from proto.pdserve_pb.pdserve.v1 import serving_pb2 as pb  # noqa: E402
from proto.pdserve_pb.pdserve.v1 import serving_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc"]
