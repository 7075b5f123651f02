"""The gRPC wire format of KV transfer: protobuf headers plus raw tensor bytes, never pickle.

A data chunk is `pool[layer, :, blocks]` of one request — `[2, n, block_size, kv_heads,
head_dim]`, C order, the machine's (little-endian) byte order — with its dtype and shape in
the header, so the receiver can check the byte count before it builds a tensor. bf16 has no
numpy dtype, so tensors cross as uint8 bytes and are re-viewed as their dtype on arrival.
"""

from __future__ import annotations

import math
import warnings

import torch

from pdserve.engine.config import torch_dtype
from pdserve.kv_transfer.receiver import ChunkRejected
from pdserve.proto import kv_pb as pb
from pdserve.proto import kv_pb_grpc as pb_grpc

__all__ = ["pb", "pb_grpc", "encode_chunk", "decode_chunk", "closing_chunk", "grpc_options",
           "DEFAULT_CHUNK_BYTES", "HEADER_SLACK"]

DEFAULT_CHUNK_BYTES = 4 * 2**20
# Room for the header fields around the payload when sizing gRPC message limits.
HEADER_SLACK = 64 * 1024

# torch.frombuffer warns that a `bytes` object is read-only; we only ever read the tensor
# (it is the source of a copy into the pool), so the warning says nothing here. Scoped to
# warnings raised from this module.
warnings.filterwarnings("ignore", message="The given buffer is not writable",
                        category=UserWarning, module=__name__)


def dtype_name(dtype: torch.dtype) -> str:
    """engine.config's name for a torch dtype ("float32", "bfloat16", "float16")."""
    return str(dtype).removeprefix("torch.")


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Channel/server options that admit one chunk of up to `max_message_bytes` payload."""
    limit = max_message_bytes + HEADER_SLACK
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def encode_chunk(request_id: str, layer: int, first_block: int, data: torch.Tensor,
                 compat_key: str = "", secret: str = "", first_head: int = 0) -> pb.KVChunk:
    """One data chunk from a host tensor `[2, n, block_size, kv_heads, head_dim]` holding
    the receiver's heads from `first_head` on; `secret` is the sink's (every message
    carries it)."""
    payload = data.contiguous().view(torch.uint8).numpy().tobytes()
    return pb.KVChunk(
        request_id=request_id, compat_key=compat_key, layer=layer, first_block=first_block,
        num_blocks=data.shape[1], dtype=dtype_name(data.dtype), shape=list(data.shape),
        data=payload, secret=secret, first_head=first_head,
    )


def closing_chunk(request_id: str, num_layers: int, abort: bool = False,
                  compat_key: str = "", secret: str = "", first_layer: int = 0) -> pb.KVChunk:
    """The last message of a stream: `done` with the layers sent — `[first_layer,
    first_layer + num_layers)` of the receiving pool, in `layer` and `num_layers` — or
    `abort`."""
    return pb.KVChunk(request_id=request_id, compat_key=compat_key, done=not abort,
                      abort=abort, layer=first_layer, num_layers=num_layers, secret=secret)


def decode_chunk(chunk: pb.KVChunk) -> torch.Tensor:
    """The chunk's payload as a read-only tensor over its bytes (no copy).

    Checks what the header alone can tell (dtype known, shape `[2, n, ...]` with n ==
    num_blocks, byte count == prod(shape) * itemsize); the receiver checks the rest against
    its pool and the reservation. Raises `ChunkRejected("INVALID_ARGUMENT", ...)`.
    """
    rid = chunk.request_id
    try:
        dtype = torch_dtype(chunk.dtype)
    except ValueError as e:
        raise ChunkRejected("INVALID_ARGUMENT", f"request {rid}: {e}") from None
    shape = tuple(chunk.shape)
    if len(shape) != 5 or shape[0] != 2 or min(shape) < 1 or shape[1] != chunk.num_blocks:
        raise ChunkRejected("INVALID_ARGUMENT",
                            f"request {rid}: chunk shape {shape} is not [2, num_blocks="
                            f"{chunk.num_blocks}, block_size, kv_heads, head_dim]")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(chunk.data) != expected:
        raise ChunkRejected("INVALID_ARGUMENT",
                            f"request {rid}: layer {chunk.layer} chunk carries {len(chunk.data)} "
                            f"bytes, shape {shape} of {chunk.dtype} needs {expected}")
    return torch.frombuffer(chunk.data, dtype=torch.uint8).view(dtype).view(shape)
