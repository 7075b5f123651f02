"""MultiConnector: the first connector that provides tokens owns the request's loads; the
blocks are kept until every connector that asked to keep them is done; aborts free at once."""

from __future__ import annotations

import pytest

from pdserve.engine.kv_connector import LoadSpec, NoKVConnector, StepTransfers
from pdserve.engine.multi_connector import MultiConnector
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.sequence import FinishReason, Sequence


class Recorder(NoKVConnector):
    """Provides `tokens` for every request, keeps blocks when `keep`, records its steps."""

    def __init__(self, tokens: int = 0, keep: bool = False):
        self.tokens, self.keep = tokens, keep
        self.started: list[StepTransfers] = []
        self.done: list[str] = []

    def num_external_tokens(self, seq, num_local_tokens):
        return self.tokens

    def request_finished(self, seq):
        return not self.keep or seq.finish_reason is FinishReason.ABORT

    def start_step(self, transfers):
        self.started.append(transfers)

    def finished_transfers(self):
        out, self.done = self.done, []
        return out


def seq(rid: str, reason: FinishReason = FinishReason.LENGTH) -> Sequence:
    s = Sequence(rid, [1, 2, 3], SamplingParams(), seed=0, token_ids=[1, 2, 3])
    s.finish_reason = reason
    return s


def test_loads_go_to_the_connector_that_provided_the_tokens():
    none, store, other = Recorder(0), Recorder(16), Recorder(32)
    multi = MultiConnector([none, store, other])
    assert multi.num_external_tokens(seq("r"), 0) == 16  # the first that provides wins
    load = LoadSpec("r", (1, 2), 0, 16)
    step = multi.build_step([], [load])
    assert step.load == (load,)
    multi.start_step(step)
    assert [t.load for t in (none.started[0], store.started[0], other.started[0])] == \
        [(), (load,), ()]


def test_blocks_are_kept_until_every_keeper_is_done_and_an_abort_frees_at_once():
    push, store = Recorder(keep=True), Recorder(keep=True)
    multi = MultiConnector([push, store])
    assert multi.request_finished(seq("r")) is False
    push.done.append("r")
    assert multi.finished_transfers() == []  # the store still copies
    store.done.append("r")
    assert multi.finished_transfers() == ["r"]
    assert multi.request_finished(seq("a")) is False
    assert multi.request_finished(seq("a", FinishReason.ABORT)) is True
    push.done.append("a")
    store.done.append("a")
    assert multi.finished_transfers() == []  # already freed by the abort


def test_every_connector_ends_its_step_when_one_fails_and_the_error_is_raised():
    class Failing(Recorder):
        def end_step(self):
            raise RuntimeError("torn load")

    ended = []

    class Ending(Recorder):
        def end_step(self):
            ended.append(self)

    first, failing, last = Ending(), Failing(), Ending()
    multi = MultiConnector([first, failing, last])
    with pytest.raises(RuntimeError, match="torn load"):
        multi.end_step()
    assert ended == [first, last]
