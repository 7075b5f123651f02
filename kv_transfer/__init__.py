"""Moving a request's KV blocks from a prefill worker's pool into a decode worker's blocks.

Transports (`grpc`, `local`, later `nccl`) sit behind `KVSender` / `KVReceiver`
(kv_transfer.base) and are built by name with `make_sender` / `make_receiver`. Imports only
the engine's KV layout contract, the `KVSink` message (`pdserve.messages`, re-exported
here), torch, grpc, protobuf — never ray, redis or the workers.
"""

from __future__ import annotations

from pdserve.kv_transfer.base import (
    IncompatibleKVError,
    KVReceiver,
    KVSender,
    KVSink,
    KVTransferError,
    SendHandle,
    TransferStatus,
)
from pdserve.kv_transfer.registry import (
    available_transports,
    make_receiver,
    make_sender,
    register_transport,
)

__all__ = [
    "IncompatibleKVError",
    "KVReceiver",
    "KVSender",
    "KVSink",
    "KVTransferError",
    "SendHandle",
    "TransferStatus",
    "available_transports",
    "make_receiver",
    "make_sender",
    "register_transport",
]
