"""The KV connector seam without a model: the scheduler consults the scheduler half (held
blocks, tokens from elsewhere, adoption), and the prefill -> decode push implements both
halves over the real `local` transport."""

from __future__ import annotations

import time

import pytest
import torch

from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache.block_manager import BlockManager, OutOfBlocksError
from pdserve.engine.kv_cache.layout import KVLayout
from pdserve.engine.kv_connector import LoadSpec, NoKVConnector
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledSeq, Scheduler
from pdserve.engine.sequence import FinishReason, Sequence
from pdserve.kv_transfer import IncompatibleKVError, KVTransferError, TransferStatus
from pdserve.kv_transfer.connector import PushSender, TransferOutcome
from pdserve.kv_transfer.push_receiver import PushReceiver

BS = 4
KEY = "test-key"


class Scripted(NoKVConnector):
    """Scheduler half under the test's control; records what the scheduler asked."""

    def __init__(self) -> None:
        self.external: dict[str, int] = {}
        self.hold = True
        self.finished_calls: list[tuple[str, FinishReason]] = []
        self.done: list[str] = []

    def num_external_tokens(self, seq: Sequence, num_local_tokens: int) -> int:
        return self.external.get(seq.request_id, 0)

    def request_finished(self, seq: Sequence) -> bool:
        self.finished_calls.append((seq.request_id, seq.finish_reason))
        return not self.hold or seq.finish_reason is FinishReason.ABORT

    def start_step(self, transfers) -> None:
        pass

    def finished_transfers(self) -> list[str]:
        out, self.done = self.done, []
        return out


def scheduler(connector, num_blocks: int = 32) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)
    return Scheduler(config, BlockManager(num_blocks, BS), 256, KEY, connector)


def seq(rid: str, n: int, max_tokens: int = 1, base: int = 100) -> Sequence:
    return Sequence(rid, list(range(base, base + n)), SamplingParams(max_tokens=max_tokens), 0)


def run_one_step(s: Scheduler) -> tuple[list[ScheduledSeq], object]:
    batch = s.schedule()
    transfers = s.build_step(batch)
    sampling = [item.seq for item in batch if item.samples]  # before postprocess moves counts
    s.postprocess(batch)
    for sq in sampling:
        s.append_token(sq, 7, (0,))
    return batch, transfers


# --- the scheduler half, consulted by the scheduler -----------------------------------------


def test_finished_request_keeps_its_blocks_until_its_transfer_ends():
    c = Scripted()
    s = scheduler(c)
    a = seq("a", 10)
    s.add(a)
    run_one_step(s)
    assert a.is_finished and c.finished_calls == [("a", FinishReason.LENGTH)]
    assert s.held == {"a": a} and s.blocks.num_free_blocks == 32 - 3
    s.transfers_finished(c.finished_transfers())  # nothing ended yet
    assert s.blocks.num_free_blocks == 29
    c.done = ["a", "unknown"]
    s.transfers_finished(c.finished_transfers())
    assert not s.held and s.blocks.num_free_blocks == 32
    assert s.blocks.num_cached_blocks == 2  # the full prompt blocks stay findable


def test_abort_of_a_held_request_asks_the_connector_again_and_frees_at_once():
    c = Scripted()
    s = scheduler(c)
    s.add(seq("a", 10))
    run_one_step(s)
    assert s.abort("a") is not None
    assert c.finished_calls == [("a", FinishReason.LENGTH), ("a", FinishReason.ABORT)]
    assert not s.held and s.blocks.num_free_blocks == 32
    c.done = ["a"]  # the transfer's late end changes nothing
    s.transfers_finished(c.finished_transfers())
    assert s.blocks.num_free_blocks == 32


def test_tokens_from_elsewhere_are_loaded_in_the_admitting_step():
    c = Scripted()
    s = scheduler(c)
    s.add(seq("warm", 9))  # caches blocks 0 and 1 of the shared prefix
    c.hold = False
    run_one_step(s)
    c.external = {"a": 100, "b": 5}  # "a": more than it has; "b": 5 after its cached 8
    a, b = seq("a", 14, max_tokens=2), seq("b", 17, max_tokens=2, base=100)
    a.prompt_token_ids = a.token_ids = [900 + i for i in range(14)]  # nothing cached
    s.add(a)
    s.add(b)
    batch, transfers = run_one_step(s)
    # The last token is always computed; everything else of "a" came from elsewhere.
    assert [(i.seq.request_id, i.num_new_tokens) for i in batch] == [("a", 1), ("b", 4)]
    assert transfers.load == (
        LoadSpec("a", tuple(a.block_ids), first_token=0, num_tokens=13),
        LoadSpec("b", tuple(b.block_ids), first_token=8, num_tokens=5),
    )
    # Cached = not computed by this request: its prefix-cache hit and what was loaded
    # (as vLLM counts it), so usage.cached_tokens shows KV store hits too.
    assert b.num_cached_tokens == 8 + 5 and a.num_cached_tokens == 13
    assert len(b.block_ids) == 5
    assert not s.build_step([]).load  # loads are listed once, in the admitting step


def test_reserve_reuses_the_cached_prefix_and_takes_nothing_when_full():
    c = Scripted()
    c.hold = False
    s = scheduler(c, num_blocks=8)
    s.add(seq("warm", 13))
    run_one_step(s)
    assert s.blocks.num_cached_blocks == 3
    ids, cached = s.reserve(13, list(range(100, 113)))
    assert len(ids) == 4 and len(cached) == 3  # 3 full blocks cached; the 4th is fresh
    assert ids[:3] == [s.blocks.lookup(h) for h in cached]
    assert s.blocks.num_free_blocks == 4
    with pytest.raises(OutOfBlocksError, match="5 blocks needed"):
        s.reserve(20, list(range(500, 520)))
    assert s.blocks.num_free_blocks == 4
    with pytest.raises(OutOfBlocksError, match="5 blocks needed"):
        s.reserve(32, list(range(100, 132)))  # shares the 3 cached, needs 5 more: no
    assert s.blocks.num_free_blocks == 4
    assert [s.blocks.ref_count(b) for b in ids] == [1, 1, 1, 1]  # the shares were dropped
    s.blocks.free(reversed(ids))
    assert s.blocks.num_free_blocks == 8


def test_adopt_needs_the_connector_to_vouch_for_every_prompt_token():
    c = Scripted()
    s = scheduler(c)
    ids, cached = s.reserve(10, None)
    a = seq("a", 10, max_tokens=3)
    with pytest.raises(RuntimeError, match=r"0 cached \+ 0 loaded of 10"):
        s.adopt(a, ids, cached)
    assert not s.running and s.blocks.num_free_blocks == 32 - 3
    c.external = {"a": 10}
    s.adopt(a, ids, cached)
    assert s.running == [a] and a.num_computed_tokens == 10
    assert s.blocks.num_cached_blocks == 2  # its full blocks are published once adopted


# --- the prefill -> decode push, both halves, over the local transport ----------------------


@pytest.fixture
def push():
    """(sender connector, receiver connector, outcomes, src pool, dst pool), wired."""
    layout = KVLayout(2, 2, 8, BS, "float32")
    src = torch.randn(layout.allocate(16, "cpu").shape)
    dst = layout.allocate(16, "cpu")
    outcomes: list[TransferOutcome] = []
    tx = PushSender("local", outcomes.append, transfer_timeout=5)
    rx = PushReceiver("local")
    tx.register_kv_cache(src, KEY)
    rx.register_kv_cache(dst, KEY)
    yield tx, rx, outcomes, src, dst
    tx.close()
    rx.close()


def prefilled(rid: str, block_ids: list[int], n: int = 10) -> ScheduledSeq:
    """The step that completes a `n`-token prompt whose KV is in `block_ids`."""
    s = seq(rid, n)
    s.block_ids = list(block_ids)
    s.num_computed_tokens = n - 2
    return ScheduledSeq(s, 2)


def run_forward(tx: PushSender, item: ScheduledSeq, layers: int = 2) -> None:
    tx.start_step(tx.build_step([item], []))
    for layer in range(layers):
        tx.wait_for_layer(layer)
        tx.save_layer(layer)
    tx.end_step()


def wait_for(pred, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "not reached in time"
        time.sleep(0.005)


@pytest.mark.parametrize("finish_first", [True, False])
def test_push_holds_the_blocks_until_the_receiver_acknowledged(push, finish_first):
    tx, rx, outcomes, src, dst = push
    sink = rx.expect("r", [9, 10], 10, time.time() + 30, first_block=1)  # receiver has block 0
    tx.send("r", sink)
    item = prefilled("r", [3, 4, 5])
    item.seq.finish_reason = FinishReason.LENGTH
    if finish_first:  # the request finishes before the transfer is closed: held
        tx.start_step(tx.build_step([item], []))
        tx.save_layer(0)
        tx.save_layer(1)
        assert tx.request_finished(item.seq) is False
        assert tx.finished_transfers() == []
        tx.end_step()
        wait_for(lambda: outcomes)
        assert tx.finished_transfers() == ["r"]
    else:  # acknowledged before the request finished: free at once, nothing reported
        run_forward(tx, item)
        wait_for(lambda: outcomes)
        assert tx.request_finished(item.seq) is True
        assert tx.finished_transfers() == []
    assert outcomes[0].error is None and outcomes[0].num_blocks == 2
    assert rx.receiver.status("r") is TransferStatus.COMPLETE
    assert torch.equal(dst[:, :, [9, 10]], src[:, :, [4, 5]]) and not dst[:, :, 3].any()
    # The decode side counts the pushed tokens as loaded, after its one cached block.
    adopting = seq("r", 10)
    assert rx.num_external_tokens(adopting, 4) == 6
    assert rx.num_external_tokens(adopting, 0) == 0  # not the reservation it made
    rx.cancel("r")
    assert rx.num_external_tokens(adopting, 4) == 0


def test_abort_during_the_push_stops_it_and_frees_at_once(push):
    tx, rx, outcomes, src, dst = push
    tx.send("r", rx.expect("r", [9, 10, 11], 10, time.time() + 30))
    item = prefilled("r", [3, 4, 5])
    tx.start_step(tx.build_step([item], []))
    tx.save_layer(0)
    item.seq.finish_reason = FinishReason.ABORT
    assert tx.request_finished(item.seq) is True
    assert rx.receiver.wait("r", 5) is TransferStatus.FAILED
    tx.save_layer(1)  # the forward pass goes on; nothing more reaches the receiver
    tx.end_step()
    time.sleep(0.05)
    assert outcomes == [] and tx.finished_transfers() == []
    assert not dst[1].any()


def test_refused_sink_reports_once_and_frees_when_the_request_ends(push):
    tx, rx, outcomes, _, _ = push
    sink = rx.expect("r", [9, 10, 11], 10, time.time() + 30)
    other = PushReceiver("local")
    other.register_kv_cache(KVLayout(2, 2, 8, BS, "float32").allocate(16, "cpu"), "other-key")
    try:
        tx.send("r", other.expect("r", [1, 2, 3], 10, time.time() + 30))
        item = prefilled("r", [3, 4, 5])
        run_forward(tx, item)
        assert len(outcomes) == 1 and isinstance(outcomes[0].error, IncompatibleKVError)
        item.seq.finish_reason = FinishReason.LENGTH
        assert tx.request_finished(item.seq) is True
        assert len(outcomes) == 1
        assert rx.receiver.status("r") is TransferStatus.PENDING and sink.num_tokens == 10
    finally:
        other.close()


def test_injected_failure_fails_the_push_after_sending(push):
    tx, rx, outcomes, _, _ = push
    tx._fail_next = 1
    tx.send("r", rx.expect("r", [9, 10, 11], 10, time.time() + 30))
    item = prefilled("r", [3, 4, 5])
    run_forward(tx, item)
    wait_for(lambda: outcomes)
    assert isinstance(outcomes[0].error, KVTransferError)
    assert "injected" in str(outcomes[0].error)
    assert rx.receiver.wait("r", 5) is TransferStatus.FAILED


def test_push_opens_once_per_request_and_only_in_its_prompts_last_step(push):
    tx, rx, outcomes, _, _ = push
    tx.send("r", rx.expect("r", [9, 10, 11], 10, time.time() + 30))
    mid = prefilled("r", [3, 4, 5])
    mid.num_new_tokens = 1  # a chunk that does not reach the prompt's end
    assert not tx.build_step([mid], []).save
    item = prefilled("r", [3, 4, 5])
    run_forward(tx, item)
    assert not tx.build_step([item], []).save  # already opened
    wait_for(lambda: outcomes)
    assert [o.error for o in outcomes] == [None]


class FollowerReplies:
    """The follower ranks' answers to the driver's `{"op": "outcomes"}`, scripted: what a
    rank group's `kv_control` returns (one reply a follower rank)."""

    def __init__(self, n: int = 1):
        self.pending: list[dict] = [{} for _ in range(n)]
        self.broken: str | None = None

    def __call__(self, op: dict) -> list[dict]:
        assert op == {"op": "outcomes"}
        if self.broken:
            raise RuntimeError(self.broken)
        out, self.pending = self.pending, [{} for _ in self.pending]
        return [{"outcomes": o} for o in out]


def start_ranked_push(tx: PushSender, rx: PushReceiver, rid: str) -> tuple[ScheduledSeq, int]:
    """A push whose step also goes to the follower ranks; returns (item, its tag)."""
    tx.send(rid, rx.expect(rid, [9, 10, 11], 10, time.time() + 30))
    item = prefilled(rid, [3, 4, 5])
    transfers = tx.build_step([item], [])
    tx.start_step(transfers)
    (meta,) = tx.rank_metadata(transfers)
    for layer in range(2):
        tx.save_layer(layer)
    tx.end_step()
    item.seq.finish_reason = FinishReason.LENGTH
    return item, meta[3]


def test_a_ranked_push_ends_when_every_follower_part_has(push):
    tx, rx, outcomes, _, _ = push
    ranks = FollowerReplies(2)
    tx.bind_ranks(ranks, wake=lambda: None)
    item, tag = start_ranked_push(tx, rx, "r")
    assert tx.request_finished(item.seq) is False  # held until every part ended
    assert rx.receiver.wait("r", 5) is TransferStatus.COMPLETE  # the driver's own part
    ranks.pending[0] = {str(tag): ""}
    time.sleep(0.1)
    assert tx.finished_transfers() == [] and outcomes == []  # rank 2 has not answered
    ranks.pending[1] = {str(tag): ""}
    wait_for(lambda: tx.finished_transfers() == ["r"] or None)
    assert [o.error for o in outcomes] == [None]


def test_a_failed_follower_part_fails_the_push_at_once_naming_the_rank(push):
    tx, rx, outcomes, _, _ = push
    ranks = FollowerReplies(2)
    tx.bind_ranks(ranks, wake=lambda: None)
    item, tag = start_ranked_push(tx, rx, "r")
    assert tx.request_finished(item.seq) is False
    ranks.pending[1] = {str(tag): "UNAVAILABLE: connection refused"}
    wait_for(lambda: tx.finished_transfers() == ["r"] or None)
    (outcome,) = outcomes
    assert "prefill rank 2 failed: UNAVAILABLE" in str(outcome.error)
    ranks.pending[0] = {str(tag): ""}  # a late part of an ended push changes nothing
    time.sleep(0.06)
    assert tx.finished_transfers() == [] and len(outcomes) == 1


def test_a_broken_rank_group_fails_the_pushes_waiting_on_it(push):
    tx, rx, outcomes, _, _ = push
    ranks = FollowerReplies(1)
    tx.bind_ranks(ranks, wake=lambda: None)
    item, _ = start_ranked_push(tx, rx, "r")
    assert tx.request_finished(item.seq) is False
    ranks.broken = "rank group failed"
    wait_for(lambda: tx.finished_transfers() == ["r"] or None)
    assert "follower ranks are unreachable: rank group failed" in str(outcomes[0].error)


def test_a_follower_rank_reports_its_parts_in_replies_under_1kib():
    import json

    from pdserve.kv_transfer.rank_connector import RankPushSender

    rank = RankPushSender("grpc", 1, 2)
    try:
        for tag in range(1, 31):
            rank._record(tag, "" if tag % 3 else "refused: " + "é" * 500)
        got: dict[str, str] = {}
        while True:
            reply = rank.control({"op": "outcomes"})
            assert len(json.dumps(reply).encode()) < 1024  # the control channel's limit
            got.update(reply["outcomes"])
            if not reply.get("more"):
                break
        assert sorted(map(int, got)) == list(range(1, 31))
        assert all(bool(got[str(t)]) == (t % 3 == 0) for t in range(1, 31))
        assert rank.control({"op": "outcomes"}) == {"outcomes": {}}
        assert "error" in rank.control({"op": "status"})
    finally:
        rank.close()
