"""Parse `GenerateRequest` bytes so that invalid UTF-8 is a client error naming the field.

protobuf refuses a `string` field holding invalid UTF-8 while parsing, before any handler
runs, and grpc then answers UNKNOWN "Unexpected DecodeError" with no field name. The router
instead swaps in a parser (through a server interceptor) that hands the handler an
`UndecodableRequest`, which it answers with INVALID_ARGUMENT. To name the field, the bytes
are parsed again with a copy of the message type whose string fields are `bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from pdserve.proto import pb

GENERATE_METHOD = "/pdserve.v1.Generation/Generate"


@dataclass(frozen=True, slots=True)
class UndecodableRequest:
    """What the handler receives instead of a request that protobuf could not parse."""

    message: str


def parse_generate_request(raw: bytes) -> pb.GenerateRequest | UndecodableRequest:
    try:
        return pb.GenerateRequest.FromString(raw)
    except DecodeError as e:
        field = _bad_utf8_field(raw)
        if field is not None:
            return UndecodableRequest(f"{field} is not valid UTF-8")
        return UndecodableRequest(f"request is not a valid GenerateRequest: {e}")


class GenerateRequestParser(grpc.aio.ServerInterceptor):
    """Parses `Generate` requests with `parse_generate_request` instead of protobuf's own."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method != GENERATE_METHOD:
            return handler
        return handler._replace(request_deserializer=parse_generate_request)


def _bad_utf8_field(raw: bytes) -> str | None:
    """The path of the first string field of `raw` that is not UTF-8 (e.g. `prompt`,
    `messages.messages[1].content`), or None if the bytes do not parse even leniently."""
    try:
        msg = _bytes_copy(pb.GenerateRequest).FromString(raw)
    except DecodeError:
        return None
    return _find_bad_utf8(msg, "")


def _find_bad_utf8(msg: Message, prefix: str) -> str | None:
    for fd, value in msg.ListFields():
        values = list(value) if fd.is_repeated else [value]
        for i, v in enumerate(values):
            where = f"{prefix}{fd.name}" + (f"[{i}]" if fd.is_repeated else "")
            if fd.type == FieldDescriptor.TYPE_MESSAGE:
                found = _find_bad_utf8(v, where + ".")
                if found:
                    return found
            elif fd.type == FieldDescriptor.TYPE_BYTES:
                try:
                    v.decode("utf-8")
                except UnicodeDecodeError:
                    return where
    return None


@cache
def _bytes_copy(message_cls: type[Message]) -> type[Message]:
    """`message_cls` rebuilt in a private pool with every `string` field turned into `bytes`
    (same numbers, so the same wire bytes parse). Its .proto file must import nothing."""
    file = descriptor_pb2.FileDescriptorProto.FromString(
        message_cls.DESCRIPTOR.file.serialized_pb)
    old, new = f".{file.package}.", f".{file.package}.lenient."
    file.name = f"lenient/{file.name}"
    file.package = new.strip(".")
    del file.service[:]  # only the messages are needed
    stack = list(file.message_type)
    while stack:
        m = stack.pop()
        stack.extend(m.nested_type)
        for f in m.field:
            if f.type == FieldDescriptor.TYPE_STRING:
                f.type = FieldDescriptor.TYPE_BYTES
            if f.type_name.startswith(old):
                f.type_name = new + f.type_name[len(old):]
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{file.package}.{message_cls.DESCRIPTOR.name}"))
