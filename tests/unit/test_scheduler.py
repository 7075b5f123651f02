"""Scheduler without a model: drive schedule() / postprocess() / append_token() with fake
sampled tokens and check what a user would notice — budgets, order, preemption, aborts,
prefix reuse, errors — and that every block comes back."""

from __future__ import annotations

import itertools

import pytest

from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache.block_hash import hash_blocks
from pdserve.engine.kv_cache.block_manager import BlockManager
from pdserve.engine.kv_connector import NoKVConnector
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import ScheduledSeq, Scheduler
from pdserve.engine.sequence import FinishReason, Sequence, SequenceStatus

BS = 4
EOS = (0,)
FAKE_TOKEN = 7  # what the "model" samples; never EOS

_ids = itertools.count()


def make_scheduler(
    num_blocks: int = 64,
    budget: int = 64,
    max_num_seqs: int = 8,
    max_model_len: int = 256,
    hold: bool = False,
    solo: int = 0,
) -> Scheduler:
    blocks = BlockManager(num_blocks, BS)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             solo_prefill_tokens=solo)
    return Scheduler(config, blocks, max_model_len, "test-key",
                     HoldOnFinish() if hold else None)


class HoldOnFinish(NoKVConnector):
    """A connector whose transfers never end by themselves: a finished request keeps its
    blocks until released; an aborted one frees them at once."""

    def request_finished(self, seq: Sequence) -> bool:
        return seq.finish_reason is FinishReason.ABORT


def make_seq(prompt: list[int] | int, max_tokens: int = 4, rid: str | None = None) -> Sequence:
    if isinstance(prompt, int):
        base = 1000 * (next(_ids) + 1)  # distinct prompts never share a prefix by accident
        prompt = [base + i for i in range(prompt)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    return Sequence(rid or f"r{next(_ids)}", list(prompt), params, seed=0)


def step(s: Scheduler) -> tuple[list[ScheduledSeq], list[Sequence]]:
    """One engine step with a fake model: returns (what ran, what finished)."""
    batch = s.schedule()
    sampling = [item.seq for item in batch if item.samples]  # before postprocess moves counts
    s.postprocess(batch)
    finished = [seq for seq in sampling if s.append_token(seq, FAKE_TOKEN, EOS)]
    return batch, finished


def run_to_completion(s: Scheduler, max_steps: int = 500) -> list[list[ScheduledSeq]]:
    steps = []
    for _ in range(max_steps):
        if not s.has_work:
            return steps
        batch, _ = step(s)
        assert batch, "scheduler made no progress while requests were pending"
        steps.append(batch)
    raise AssertionError(f"requests still pending after {max_steps} steps")


def shape(batch: list[ScheduledSeq]) -> list[tuple[str, int]]:
    return [(item.seq.request_id, item.num_new_tokens) for item in batch]


# --- budget and chunking -------------------------------------------------------------------


def test_long_prompt_is_chunked_under_the_token_budget():
    s = make_scheduler(budget=8)
    seq = make_seq(20, max_tokens=2, rid="a")
    s.add(seq)
    b1, _ = step(s)
    b2, _ = step(s)
    b3, _ = step(s)
    assert [shape(b) for b in (b1, b2, b3)] == [[("a", 8)], [("a", 8)], [("a", 4)]]
    assert seq.num_output_tokens == 1  # sampled only when the prompt was complete
    b4, done = step(s)
    assert shape(b4) == [("a", 1)] and done == [seq]
    assert seq.finish_reason is FinishReason.LENGTH
    assert seq.output_token_ids == [FAKE_TOKEN, FAKE_TOKEN]
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_every_step_stays_within_the_token_budget():
    s = make_scheduler(budget=10)
    seqs = [make_seq(n, max_tokens=5) for n in (3, 17, 9, 25, 1)]
    for seq in seqs:
        s.add(seq)
    steps = run_to_completion(s)
    assert all(sum(item.num_new_tokens for item in b) <= 10 for b in steps)
    assert sum(item.num_new_tokens for b in steps for item in b) == sum(
        seq.num_prompt_tokens + 4 for seq in seqs  # last sampled token is never fed back
    )
    assert all(seq.num_output_tokens == 5 for seq in seqs)
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_decode_rows_come_before_new_prefills():
    s = make_scheduler(budget=8)
    a = make_seq(4, max_tokens=10, rid="a")
    s.add(a)
    step(s)  # a's prompt; a is now decoding
    b = make_seq(30, max_tokens=1, rid="b")
    s.add(b)
    batch, _ = step(s)
    # a's decode token is scheduled first; b's prefill gets what is left of the budget.
    assert shape(batch) == [("a", 1), ("b", 7)]
    batch, _ = step(s)
    assert shape(batch) == [("a", 1), ("b", 7)]
    run_to_completion(s)
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


# --- solo prefills ----------------------------------------------------------------------


def one_decoding(budget: int, solo: int, max_tokens: int = 20) -> tuple[Scheduler, Sequence]:
    """A scheduler whose one request "a" has had its prompt computed and now decodes."""
    s = make_scheduler(budget=budget, solo=solo)
    a = make_seq(4, max_tokens=max_tokens, rid="a")
    s.add(a)
    step(s)
    return s, a


def test_a_short_prompt_runs_alone_then_the_decode_rows_with_it():
    s = make_scheduler(budget=64, solo=16)
    a, b = make_seq(4, max_tokens=20, rid="a"), make_seq(6, max_tokens=20, rid="b")
    s.add(a)
    s.add(b)
    step(s)  # both prompts: nothing decodes yet, an ordinary step
    c = make_seq(8, max_tokens=3, rid="c")
    s.add(c)
    batch, _ = step(s)
    assert shape(batch) == [("c", 8)]  # alone: c's first token now
    assert c.num_output_tokens == 1 and a.num_output_tokens == b.num_output_tokens == 1
    d = make_seq(5, max_tokens=3, rid="d")
    s.add(d)
    batch, _ = step(s)  # never two solo steps in a row: the rows, c, and d mixed in
    assert shape(batch) == [("a", 1), ("b", 1), ("c", 1), ("d", 5)]
    e = make_seq(4, max_tokens=3, rid="e")
    s.add(e)
    batch, _ = step(s)
    assert shape(batch) == [("e", 4)]
    assert s.num_solo_steps == 2
    run_to_completion(s)
    assert all(x.num_output_tokens == x.params.max_tokens for x in (a, b, c, d, e))
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_solo_steps_take_only_prompts_that_finish_within_the_limit():
    s, _ = one_decoding(budget=64, solo=12)
    short, long_ = make_seq(5, max_tokens=2, rid="short"), make_seq(9, max_tokens=2, rid="long")
    s.add(short)
    s.add(long_)
    batch, _ = step(s)  # 5 + 9 > 12: the long one waits for the next (mixed) step
    assert shape(batch) == [("short", 5)]
    assert long_.status is SequenceStatus.WAITING and not long_.block_ids
    batch, _ = step(s)
    assert shape(batch) == [("a", 1), ("short", 1), ("long", 9)]
    run_to_completion(s)
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_a_prompt_longer_than_the_limit_shares_its_steps_as_before():
    s, _ = one_decoding(budget=8, solo=8)
    b = make_seq(20, max_tokens=1, rid="b")
    s.add(b)
    # Chunks 7 + 7 + 6: only the last fits the limit, and it runs alone.
    steps = [shape(step(s)[0]) for _ in range(4)]
    assert steps == [[("a", 1), ("b", 7)], [("a", 1), ("b", 7)], [("b", 6)], [("a", 1)]]
    assert b.is_finished
    run_to_completion(s)
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_a_cached_prefix_counts_only_the_tokens_left_to_compute():
    s, _ = one_decoding(budget=64, solo=8)
    shared = list(range(500, 520))  # 5 full blocks
    s.add(make_seq(shared + [1, 2], max_tokens=1, rid="first"))
    batch, done = step(s)  # beside "a" (22 tokens: no solo step); its blocks stay cached
    assert shape(batch) == [("a", 1), ("first", 22)] and len(done) == 1
    again = make_seq(shared + [3, 4, 5], max_tokens=2, rid="again")  # 23 tokens, 20 cached
    s.add(again)
    batch, _ = step(s)
    assert shape(batch) == [("again", 3)]
    run_to_completion(s)
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_solo_prefills_off_mixes_prompts_with_decode_rows():
    s, _ = one_decoding(budget=64, solo=0)
    s.add(make_seq(3, max_tokens=2, rid="b"))
    batch, _ = step(s)
    assert shape(batch) == [("a", 1), ("b", 3)]
    assert s.num_solo_steps == 0


def test_max_num_seqs_limits_running_requests():
    s = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(5, max_tokens=3, rid=f"s{i}") for i in range(3)]
    for seq in seqs:
        s.add(seq)
    batch, _ = step(s)
    assert [item.seq.request_id for item in batch] == ["s0", "s1"]
    assert seqs[2].status is SequenceStatus.WAITING
    step(s)
    batch, done = step(s)  # s0 and s1 reach max_tokens=3
    assert set(done) == {seqs[0], seqs[1]}
    batch, _ = step(s)
    assert shape(batch) == [("s2", 5)]
    for b in run_to_completion(s):
        assert len(b) <= 2
    assert seqs[2].finish_reason is FinishReason.LENGTH
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


# --- preemption ----------------------------------------------------------------------------


def test_newest_running_request_is_preempted_when_blocks_run_out():
    # 6 blocks of 4 tokens; each request needs 4 blocks by its end (8 prompt + 8 output).
    s = make_scheduler(num_blocks=6, budget=64)
    old = make_seq(8, max_tokens=8, rid="old")
    new = make_seq(8, max_tokens=8, rid="new")
    s.add(old)
    s.add(new)
    step(s)  # both prefilled: 4 blocks used, 2 free
    for _ in range(4):  # positions 8..11 go to each one's third block
        batch, _ = step(s)
        assert shape(batch) == [("old", 1), ("new", 1)]
    assert s.blocks.num_free_blocks == 0 and s.num_preemptions == 0
    batch, _ = step(s)  # both need a fourth block: the newest running request gives way
    assert shape(batch) == [("old", 1)]
    assert s.num_preemptions == 1
    assert s.num_preempted_tokens == 12  # its prompt and 4 decoded tokens: to recompute
    assert list(s.waiting) == [new] and new.status is SequenceStatus.WAITING
    assert new.block_ids == [] and new.num_computed_tokens == 0  # its blocks were freed
    assert len(old.block_ids) == 4
    run_to_completion(s)
    for seq in (old, new):
        assert seq.finish_reason is FinishReason.LENGTH
        assert seq.output_token_ids == [FAKE_TOKEN] * 8
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_preempted_request_goes_before_requests_that_never_ran():
    s = make_scheduler(num_blocks=6, budget=64, max_num_seqs=2)
    old = make_seq(8, max_tokens=8, rid="old")
    new = make_seq(8, max_tokens=8, rid="new")
    late = make_seq(4, max_tokens=1, rid="late")
    for seq in (old, new, late):
        s.add(seq)
    for _ in range(6):
        step(s)  # prefill, 4 decodes into the third block, then 'new' is preempted
    assert [seq.request_id for seq in s.waiting] == ["new", "late"]
    order = [item.seq.request_id for b in run_to_completion(s) for item in b]
    assert order.index("new") < order.index("late")
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_two_requests_that_each_fit_alone_both_finish_in_a_tight_pool():
    # 5 blocks; each request needs 4 by its end, so they cannot both run to completion at
    # once: one is preempted (repeatedly, perhaps), and must never hold blocks while it
    # waits, or both end up waiting on each other.
    s = make_scheduler(num_blocks=5, budget=64)
    a = make_seq(8, max_tokens=8, rid="a")
    b = make_seq(8, max_tokens=8, rid="b")
    s.add(a)
    s.add(b)
    for _ in range(100):
        if not s.has_work:
            break
        batch, _ = step(s)
        assert batch, "both requests wait on each other"
        for seq in s.waiting:
            assert seq.block_ids == []
    assert not s.has_work
    assert s.num_preemptions > 0
    for seq in (a, b):
        assert seq.output_token_ids == [FAKE_TOKEN] * 8
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_preemption_under_pressure_never_deadlocks():
    # A small pool and long outputs: requests must repeatedly preempt each other, and
    # preempted requests re-match their own cached blocks. Everyone must finish.
    s = make_scheduler(num_blocks=7, budget=16)
    seqs = [make_seq(n, max_tokens=14) for n in (9, 6, 11, 5)]
    for seq in seqs:
        s.add(seq)
    run_to_completion(s, max_steps=1000)
    assert s.num_preemptions > 0
    for seq in seqs:
        assert seq.finish_reason is FinishReason.LENGTH
        assert seq.output_token_ids == [FAKE_TOKEN] * 14
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_evicting_a_finished_prefix_keeps_its_head_matchable():
    # A finished request's blocks stay cached; when allocation must evict some of them, the
    # tail goes first, so a later request with the same prompt still reuses the head.
    s = make_scheduler(num_blocks=6, budget=64)
    prompt = list(range(300, 313))  # 3 full blocks + 1 token
    s.add(make_seq(prompt, max_tokens=1))
    run_to_completion(s)  # 4 blocks used; 3 full ones cached, now evictable
    s.add(make_seq(12, max_tokens=1))  # 3 blocks: the plain free ones
    s.add(make_seq(4, max_tokens=1))  # 1 block: must evict one cached block
    run_to_completion(s)
    again = make_seq(prompt, max_tokens=1, rid="again")
    s.add(again)
    step(s)
    assert again.num_cached_tokens == 8  # blocks 0 and 1 survived; block 2 was evicted
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


# --- abort ---------------------------------------------------------------------------------


def test_abort_of_running_and_waiting_requests_frees_blocks():
    s = make_scheduler(budget=12, max_num_seqs=2)
    running = make_seq(10, max_tokens=8, rid="run")
    prefilling = make_seq(30, max_tokens=8, rid="pre")
    waiting = make_seq(6, max_tokens=8, rid="wait")
    for seq in (running, prefilling, waiting):
        s.add(seq)
    step(s)  # run: 10 tokens, pre: first 2
    step(s)
    assert running.block_ids and prefilling.block_ids and prefilling.in_prefill
    assert waiting.status is SequenceStatus.WAITING
    assert s.abort("run") is running
    assert s.abort("pre") is prefilling
    assert s.abort("wait") is waiting
    assert s.abort("unknown") is None
    for seq in (running, prefilling, waiting):
        assert seq.finish_reason is FinishReason.ABORT and seq.block_ids == []
    assert not s.has_work
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_abort_of_waiting_request_with_cached_prefix_frees_everything():
    s = make_scheduler(num_blocks=4, budget=64)
    prompt = list(range(100, 109))  # 9 tokens: 2 full blocks + 1
    first = make_seq(prompt, max_tokens=1, rid="first")
    s.add(first)
    run_to_completion(s)
    hog = make_seq(5, max_tokens=3, rid="hog")  # the 2 plain free blocks, all its life
    s.add(hog)
    step(s)
    again = make_seq(prompt, max_tokens=4, rid="again")
    s.add(again)  # its prefix is cached, but the block for its last token is not free
    batch, _ = step(s)
    assert shape(batch) == [("hog", 1)]
    assert again.status is SequenceStatus.WAITING
    assert s.abort("again") is again
    run_to_completion(s)
    assert s.blocks.num_free_blocks == s.blocks.num_blocks
    assert s.blocks.lookup(hash_blocks(prompt, BS, "test-key")[0]) is not None  # still cached


# --- prefix cache --------------------------------------------------------------------------


def test_second_request_reuses_committed_prefix_blocks():
    s = make_scheduler()
    shared = list(range(500, 510))  # 2 full blocks + 2 tokens
    first = make_seq(shared + [1, 2], max_tokens=2, rid="first")
    s.add(first)
    step(s)  # prefill: blocks 0..2 full -> committed
    assert first.num_cached_tokens == 0
    first_blocks = list(first.block_ids)
    second = make_seq(shared + [3, 4, 5], max_tokens=2, rid="second")
    s.add(second)
    batch, _ = step(s)
    # The first 8 tokens (2 blocks) come from the cache; only the rest is computed.
    assert ("second", 13 - 8) in shape(batch)
    assert second.num_cached_tokens == 8
    assert second.block_ids[:2] == first_blocks[:2]
    assert s.blocks.ref_count(first_blocks[0]) == 1  # 'first' finished this step
    run_to_completion(s)
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_prefix_match_never_covers_the_last_prompt_token():
    s = make_scheduler()
    prompt = list(range(700, 708))  # exactly 2 full blocks
    s.add(make_seq(prompt, max_tokens=1))
    run_to_completion(s)
    again = make_seq(prompt, max_tokens=1, rid="again")
    s.add(again)
    batch, done = step(s)
    # Block 2 holds the last prompt token, whose logits are needed to sample: recomputed.
    assert shape(batch) == [("again", 4)]
    assert again.num_cached_tokens == 4
    assert done == [again]
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_blocks_are_findable_only_after_their_kv_is_computed():
    s = make_scheduler(budget=8)
    prompt = list(range(900, 913))
    first = make_seq(prompt, max_tokens=1, rid="first")
    s.add(first)
    step(s)  # first: tokens 0..7 computed, blocks 0 and 1 committed
    second = make_seq(prompt, max_tokens=1, rid="second")
    s.add(second)
    batch, _ = step(s)
    # first computes block 2 in this very step; second may only reuse blocks 0 and 1.
    assert shape(batch) == [("first", 5), ("second", 3)]
    assert second.num_cached_tokens == 8
    run_to_completion(s)
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


# --- admission errors and held blocks ------------------------------------------------------


def test_check_fits_names_both_numbers():
    s = make_scheduler(num_blocks=64, max_model_len=100)
    with pytest.raises(ValueError) as e:
        s.check_fits(90, 20)
    assert "90" in str(e.value) and "20" in str(e.value) and "100" in str(e.value)
    with pytest.raises(ValueError, match="empty"):
        s.check_fits(0, 5)
    small = make_scheduler(num_blocks=3, max_model_len=100)
    with pytest.raises(ValueError) as e:
        small.check_fits(10, 10)  # 20 tokens = 5 blocks > 3
    assert "5" in str(e.value) and "3" in str(e.value)
    with pytest.raises(ValueError):
        s.add(make_seq(95, max_tokens=10))
    assert not s.has_work
    s.check_fits(80, 20)  # exactly the context length is fine


def test_hold_blocks_on_finish_keeps_blocks_until_release():
    s = make_scheduler(hold=True)
    seq = make_seq(10, max_tokens=2)
    s.add(seq)
    run_to_completion(s)
    assert seq.is_finished and seq.finish_reason is FinishReason.LENGTH
    held = list(seq.block_ids)
    assert len(held) == 3  # 11 computed tokens (10 prompt + 1 fed back) in 4-token blocks
    assert s.blocks.num_free_blocks == s.blocks.num_blocks - 3
    assert all(s.blocks.ref_count(b) == 1 for b in held)
    s.release(seq)
    assert seq.block_ids == []
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_hold_blocks_on_finish_still_frees_on_abort():
    s = make_scheduler(hold=True)
    seq = make_seq(10, max_tokens=5, rid="x")
    s.add(seq)
    step(s)
    s.abort("x")
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_stop_token_ids_and_eos_wait_for_min_tokens():
    s = make_scheduler()
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=3, stop_token_ids=(9,))
    seq = Sequence("x", [1, 2, 3], params, seed=0)
    s.add(seq)
    step(s)  # first output token (FAKE_TOKEN)
    assert not s.append_token(seq, 9, EOS)  # 2nd token: below min_tokens, no stop
    assert not seq.is_finished
    assert s.append_token(seq, EOS[0], EOS)  # 3rd token: min_tokens reached, EOS ends it
    assert seq.finish_reason is FinishReason.STOP
    assert seq.output_token_ids == [FAKE_TOKEN, 9, EOS[0]]
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


def test_stop_token_id_ends_request():
    s = make_scheduler()
    params = SamplingParams(temperature=0, max_tokens=10, stop_token_ids=(9,))
    seq = Sequence("x", [1, 2, 3], params, seed=0)
    s.add(seq)
    step(s)
    assert s.append_token(seq, 9, EOS)
    assert seq.finish_reason is FinishReason.STOP and not s.has_work
    assert s.blocks.num_free_blocks == s.blocks.num_blocks


# --- steps in flight (pipeline overlap) -----------------------------------------------------


def test_capped_steps_alternate_over_sequences_not_in_flight():
    s = make_scheduler()
    seqs = [make_seq(4, max_tokens=8, rid=f"d{i}") for i in range(3)]
    for seq in seqs:
        s.add(seq)
    step(s)  # all three prefilled
    first = s.schedule(max_running=2)
    assert shape(first) == [("d0", 1), ("d1", 1)]
    for item in first:
        item.seq.in_flight = True  # its step is submitted, not collected
    second = s.schedule(max_running=2)
    assert shape(second) == [("d2", 1)]  # never a sequence whose step is still running
    for item in second:
        item.seq.in_flight = True
    assert s.schedule(max_running=2) == []


def test_a_sequence_in_flight_is_never_preempted():
    # As above: 6 blocks; both requests need a fourth block at once.
    s = make_scheduler(num_blocks=6, budget=64)
    old = make_seq(8, max_tokens=8, rid="old")
    new = make_seq(8, max_tokens=8, rid="new")
    s.add(old)
    s.add(new)
    for _ in range(5):
        step(s)
    assert s.blocks.num_free_blocks == 0
    new.in_flight = True  # the newest, but a stage may still write its blocks
    new_blocks = list(new.block_ids)
    assert s.schedule() == []  # old gave way instead: it is the newest not in flight
    assert list(s.waiting) == [old] and old.block_ids == []
    assert new.block_ids == new_blocks and new.status is SequenceStatus.RUNNING
    new.in_flight = False
    run_to_completion(s)
    assert [seq.output_token_ids for seq in (old, new)] == [[FAKE_TOKEN] * 8] * 2
    assert s.blocks.num_free_blocks == s.blocks.num_blocks
