from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class KVChunk(_message.Message):
    __slots__ = ("request_id", "compat_key", "layer", "first_block", "num_blocks", "dtype", "shape", "data", "done", "num_layers", "abort", "secret", "first_head")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COMPAT_KEY_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    FIRST_HEAD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    compat_key: str
    layer: int
    first_block: int
    num_blocks: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    done: bool
    num_layers: int
    abort: bool
    secret: str
    first_head: int
    def __init__(self, request_id: _Optional[str] = ..., compat_key: _Optional[str] = ..., layer: _Optional[int] = ..., first_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., done: _Optional[bool] = ..., num_layers: _Optional[int] = ..., abort: _Optional[bool] = ..., secret: _Optional[str] = ..., first_head: _Optional[int] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("request_id", "layers_received", "complete", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layers_received: int
    complete: bool
    error: str
    def __init__(self, request_id: _Optional[str] = ..., layers_received: _Optional[int] = ..., complete: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...
