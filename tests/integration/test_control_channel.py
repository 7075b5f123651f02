"""The rank group's control channel delivers every message whole and in order, whatever its
size against the one-broadcast frame: empty-ish, exactly the frame's body, one byte more,
and far larger. Two spawned ranks over loopback gloo."""

from __future__ import annotations

import json
from pathlib import Path

from rank_procs import free_port, join_all, start_ranks

from pdserve.engine.executor import group as group_mod

HEAD = group_mod._FRAME_BYTES - group_mod._LEN_BYTES


def _messages() -> list[dict]:
    out = [{"op": "small"}]
    for target in (HEAD - 1, HEAD, HEAD + 1, 5 * HEAD + 17):
        # A map whose msgpack encoding is exactly `target` bytes: fixmap(2) + "op" + str,
        # then "p" + a bin8/16/32 blob; solved by trying lengths around the estimate.
        for n in range(max(0, target - 32), target + 1):
            msg = {"op": "sized", "p": b"\x07" * n}
            if len(group_mod.msgpack.packb(msg, use_bin_type=True)) == target:
                out.append(msg)
                break
        else:
            raise AssertionError(f"no message of {target} bytes")
    return out


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    g = group_mod.init_rank_group(rank, 2, f"tcp://127.0.0.1:{port}", timeout_s=20.0)
    msgs = _messages()
    if g.is_driver:
        for m in msgs:
            g.control.send(m)
    else:
        got = [g.control.recv(timeout_s=20.0) for _ in msgs]
        sizes = [len(group_mod.msgpack.packb(m, use_bin_type=True)) for m in got]
        Path(out_dir, "follower.json").write_text(
            json.dumps({"equal": got == msgs, "sizes": sizes}))
    g.control.gather_text("")  # both ranks stay until the follower has read everything
    g.destroy()


def test_messages_of_every_size_arrive_whole(tmp_path: Path) -> None:
    ctx = start_ranks(_rank_main, (free_port(), str(tmp_path)), 2)
    join_all(ctx, 120)
    result = json.loads((tmp_path / "follower.json").read_text())
    assert result["sizes"][1:] == [HEAD - 1, HEAD, HEAD + 1, 5 * HEAD + 17]
    assert result["equal"]
