"""Invalid UTF-8 in a GenerateRequest becomes a clear error naming the field."""

from __future__ import annotations

import pytest

from pdserve.proto import pb
from pdserve.router.request_decoding import UndecodableRequest, parse_generate_request

BAD = b"bad-\xff\xfe-utf8"
MARK = b"PLACEHOLDER"  # same length as BAD, so the length prefixes stay right


def with_bad_bytes(req: pb.GenerateRequest) -> bytes:
    raw = req.SerializeToString()
    assert raw.count(MARK) == 1 and len(MARK) == len(BAD)
    return raw.replace(MARK, BAD)


def test_valid_request_parses_unchanged():
    req = pb.GenerateRequest(prompt="héllo ✓", model="m", request_id="r1")
    req.sampling.max_tokens = 3
    assert parse_generate_request(req.SerializeToString()) == req


@pytest.mark.parametrize("field,req", [
    ("prompt", pb.GenerateRequest(prompt="PLACEHOLDER")),
    ("model", pb.GenerateRequest(prompt="hi", model="PLACEHOLDER")),
    ("messages.messages[1].content", pb.GenerateRequest(messages=pb.ChatMessages(messages=[
        pb.ChatMessage(role="user", content="hi"),
        pb.ChatMessage(role="user", content="PLACEHOLDER")]))),
    ("sampling.stop[1]", pb.GenerateRequest(
        prompt="hi", sampling=pb.SamplingParams(max_tokens=2, stop=["ok", "PLACEHOLDER"]))),
])
def test_invalid_utf8_names_the_field(field, req):
    assert parse_generate_request(with_bad_bytes(req)) == UndecodableRequest(
        f"{field} is not valid UTF-8")


def test_corrupt_bytes_are_reported_as_such():
    got = parse_generate_request(b"\xff\xff\xff")
    assert isinstance(got, UndecodableRequest)
    assert got.message.startswith("request is not a valid GenerateRequest")
