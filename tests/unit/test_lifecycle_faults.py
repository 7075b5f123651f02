"""The router's side of worker death, on synthetic workers (no Ray, no model): migration
of a stream off a dead decode worker, retry of a dead prefill worker, a clear error when a
pool is empty, lease renewal while a prefill runs, an abort for a reservation the client
gave up on while it was being made, and Health/Stats that stay true.

The synthetic workers implement `router.workers`' interfaces the way a real worker behaves
where it matters here: the token at each position is a function of every token before it
(as a model's greedy choice is), so a continuation from the wrong place shows."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.engine.sampling_params import SamplingParams
from pdserve.messages import KVSink, OutputChunk, PrefillResult, WorkerRequest, WorkerStats
from pdserve.router.lifecycle import RequestLifecycle, WorkerLost
from pdserve.router.policy import NoWorkerUp, RoutingPolicy
from pdserve.router.workers import DecodeClient, PrefillClient, WorkerDown

PROMPT = [5, 9, 2, 7]
N = 8


def next_token(tokens: list[int]) -> int:
    return (sum(t * (i + 1) for i, t in enumerate(tokens)) + len(tokens)) % 997


def reference(prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def text_of(token: int) -> str:
    return f"<{token}>"


class SynthPrefill(PrefillClient):
    def __init__(self, worker_id: str, seconds: float = 0.0, dead: bool = False):
        self.worker_id, self.seconds, self.dead = worker_id, seconds, dead
        self.requests: list[WorkerRequest] = []
        self.aborted: list[str] = []

    async def prefill(self, request: WorkerRequest, sink: KVSink) -> PrefillResult:
        self.requests.append(request)
        await asyncio.sleep(self.seconds)
        if self.dead:
            raise WorkerDown(self.worker_id, f"worker {self.worker_id} is down")
        token = next_token(list(request.all_token_ids))
        return PrefillResult(request.request_id, token, None, (), "length", 0, None)

    async def abort(self, request_id: str) -> bool:
        if self.dead:
            raise WorkerDown(self.worker_id, f"worker {self.worker_id} is down")
        self.aborted.append(request_id)
        return False

    async def stats(self) -> WorkerStats:
        return WorkerStats(self.worker_id, "prefill", 10, 10, 0, 0, 0, 0)


class SynthDecode(DecodeClient):
    """Streams one token a chunk; `die_after` tokens into a stream it dies (WorkerDown from
    then on, for every call); `reserve_seconds` delays each reserve."""

    def __init__(self, worker_id: str, die_after: int | None = None,
                 reserve_seconds: float = 0.0, hang_stats: bool = False):
        self.worker_id, self.die_after = worker_id, die_after
        self.reserve_seconds, self.hang_stats = reserve_seconds, hang_stats
        self.dead = False
        self.reserved: dict[str, tuple[int, int]] = {}  # rid -> (tokens, max_tokens)
        self.renewals = 0
        self.requests: list[WorkerRequest] = []

    def _check(self) -> None:
        if self.dead:
            raise WorkerDown(self.worker_id, f"worker {self.worker_id} is down")

    async def reserve(self, request_id, num_prompt_tokens, max_tokens, lease_s,
                      prompt_token_ids=None) -> KVSink:
        self._check()

        async def on_the_worker() -> KVSink:
            await asyncio.sleep(self.reserve_seconds)
            self.reserved[request_id] = (num_prompt_tokens, max_tokens)
            return KVSink("grpc", "127.0.0.1:1", request_id, (0,), num_prompt_tokens, "k", 0.0)

        # A remote call goes on when its caller stops waiting for it.
        return await asyncio.shield(asyncio.ensure_future(on_the_worker()))

    async def renew(self, request_id: str, lease_s: float) -> bool:
        self._check()
        self.renewals += 1
        return request_id in self.reserved

    async def abort(self, request_id: str) -> bool:
        self._check()
        return self.reserved.pop(request_id, None) is not None

    async def stats(self) -> WorkerStats:
        self._check()
        if self.hang_stats:
            await asyncio.sleep(3600)
        return WorkerStats(self.worker_id, "decode", 10, 10, 0, 0, 0, 0)

    async def _generate(self, request: WorkerRequest, first: int | None = None):
        self._check()
        self.requests.append(request)
        tokens = list(request.all_token_ids)
        left = request.params.max_tokens - len(request.resumed_token_ids)
        for i in range(left):
            if self.die_after is not None and len(tokens) - len(PROMPT) >= self.die_after:
                self.dead = True
                self._check()
            t = first if (i == 0 and first is not None) else next_token(tokens)
            tokens.append(t)
            done = i == left - 1
            yield OutputChunk((t,), text_of(t), (), done, "length" if done else "")
            await asyncio.sleep(0)

    def stream_from_prefill(self, request, first: PrefillResult):
        self.reserved.pop(request.request_id, None)
        return self._generate(request, first.token_id)

    def stream_local(self, request):
        return self._generate(request)


def lifecycle(mode: str, prefill, decode, lease_seconds: float = 30.0) -> RequestLifecycle:
    return RequestLifecycle(mode, prefill, decode, RoutingPolicy(16),
                            lease_seconds=lease_seconds)


async def run(lc: RequestLifecycle, rid: str = "r1") -> tuple[list[int], str]:
    params = SamplingParams(temperature=0, max_tokens=N, seed=1)
    ids, text = [], ""
    async for chunk in lc.run(rid, PROMPT, params):
        ids.extend(chunk.token_ids)
        text += chunk.text
    return ids, text


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_a_stream_on_a_dying_decode_worker_migrates_without_gap_or_repeat(mode):
    d0, d1 = SynthDecode("d0", die_after=3), SynthDecode("d1")
    p = [SynthPrefill("p0")] if mode == "disaggregated" else []
    lc = lifecycle(mode, p, [d0, d1])
    downs: list[str] = []
    lc.on_worker_down = downs.append
    lc.policy.update_stats([WorkerStats("d0", "decode", 99, 99, 0, 0, 0, 0)])  # d0 first

    ids, text = asyncio.run(run(lc))

    expected = reference(PROMPT, N)
    assert ids == expected and text == "".join(map(text_of, expected))
    (resumed,) = d1.requests
    assert resumed.resumed_token_ids == tuple(expected[:3])
    assert resumed.resumed_chars == len("".join(map(text_of, expected[:3])))
    assert resumed.params.max_tokens == N  # the original's: the worker counts from 3
    if mode == "disaggregated":
        # A new handoff of prompt + streamed tokens, reserving room for the rest only.
        assert p[0].requests[-1].all_token_ids == tuple(PROMPT + expected[:3])
        assert not d1.reserved
    assert downs == ["d0"] and lc.policy.down == {"d0"}
    assert lc.counters.migrations == 1 and lc.counters.finished == 1
    assert lc.counters.in_flight == 0


def test_with_no_decode_worker_left_the_stream_ends_with_a_clear_error():
    d0 = SynthDecode("d0", die_after=2)
    lc = lifecycle("colocated", [], [d0])
    got: list[int] = []

    async def go():
        async for chunk in lc.run("r1", PROMPT, SamplingParams(max_tokens=N, seed=1)):
            got.extend(chunk.token_ids)

    with pytest.raises(NoWorkerUp, match="no decode worker is up"):
        asyncio.run(go())
    assert got == reference(PROMPT, 2)
    assert not lc.health().serving and lc.health().down == ("d0",)
    with pytest.raises(NoWorkerUp):  # new requests are refused at once
        asyncio.run(run(lc, "r2"))


def test_migrations_are_bounded():
    workers = [SynthDecode(f"d{i}", die_after=1 + i) for i in range(4)]
    lc = lifecycle("colocated", [], workers)
    lc.policy.update_stats([WorkerStats(f"d{i}", "decode", 90 - i, 99, 0, 0, 0, 0)
                            for i in range(4)])
    with pytest.raises(WorkerLost, match="moved 2 times"):
        asyncio.run(run(lc))


def test_a_dead_prefill_worker_is_retried_elsewhere_and_not_picked_again():
    p0, p1 = SynthPrefill("p0", dead=True), SynthPrefill("p1")
    d = SynthDecode("d0")
    lc = lifecycle("disaggregated", [p0, p1], [d])
    assert asyncio.run(run(lc, "r1"))[0] == reference(PROMPT, N)
    assert lc.policy.down == {"p0"} and lc.counters.handoff_retries == 1
    assert asyncio.run(run(lc, "r2"))[0] == reference(PROMPT, N)
    assert len(p0.requests) == 1 and len(p1.requests) == 2
    assert not d.reserved
    h = lc.health()
    assert (h.serving, h.prefill_up, h.decode_up, h.down) == (True, 1, 1, ("p0",))


def test_the_lease_is_renewed_while_the_prefill_runs():
    p, d = SynthPrefill("p0", seconds=0.5), SynthDecode("d0")
    lc = lifecycle("disaggregated", [p], [d], lease_seconds=0.15)
    assert asyncio.run(run(lc))[0] == reference(PROMPT, N)
    assert d.renewals >= 5  # every lease/3 for 0.5 s


def test_a_reservation_made_after_the_client_left_is_aborted_not_left_to_its_lease():
    d = SynthDecode("d0", reserve_seconds=0.2)
    lc = lifecycle("disaggregated", [SynthPrefill("p0")], [d])

    async def go():
        task = asyncio.create_task(run(lc))
        await asyncio.sleep(0.05)  # the reserve call is on its way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)  # the worker has answered the reserve by now

    asyncio.run(go())
    assert not d.reserved and lc.counters.in_flight == 0


def test_stats_show_every_worker_and_mark_the_dead_and_the_hung():
    d0, d1, d2 = SynthDecode("d0"), SynthDecode("d1", hang_stats=True), SynthDecode("d2")
    d2.dead = True
    lc = lifecycle("colocated", [], [d0, d1, d2])
    reports = asyncio.run(lc.worker_reports(timeout=0.2))
    assert [(r.worker_id, r.role, r.stats is not None) for r in reports] == [
        ("d0", "colocated", True), ("d1", "colocated", False), ("d2", "colocated", False)]
    assert lc.policy.down == {"d2"}  # dead for sure; the slow one is the supervisor's call


class Replacer:
    """Stands in for `Cluster.replace_worker`: the new process answers."""

    def __init__(self, workers: dict[str, SynthDecode]):
        self.workers, self.replaced = workers, []

    def replace_worker(self, worker_id: str, ready_timeout: float) -> str:
        w = self.workers[worker_id]
        w.dead = w.hang_stats = False
        self.replaced.append(worker_id)
        return f"handle of the new {worker_id}"


def test_the_supervisor_takes_dead_and_hung_workers_out_and_brings_them_back():
    from pdserve.cluster.config import HealthSection
    from pdserve.cluster.supervisor import Supervisor

    d0, d1, d2 = SynthDecode("d0"), SynthDecode("d1", hang_stats=True), SynthDecode("d2")
    d2.dead = True
    lc = lifecycle("colocated", [], [d0, d1, d2])
    cluster = Replacer({"d1": d1, "d2": d2})
    sup = Supervisor(cluster, lc, HealthSection(probe_interval=0.05, probe_timeout=0.2))

    async def go():
        await sup.probe()
        assert lc.policy.down == {"d1", "d2"} and lc.health().decode_up == 1
        task = asyncio.create_task(sup.run())
        for _ in range(100):
            await asyncio.sleep(0.05)
            if not lc.policy.down:
                break
        task.cancel()

    asyncio.run(go())
    assert sorted(cluster.replaced) == ["d1", "d2"] and not lc.policy.down
    assert d1.handle == "handle of the new d1" and lc.counters.workers_replaced == 2
    assert lc.health().decode_up == 3


def test_kv_aware_routing_through_the_lifecycle():
    """A prompt goes back to the prefill worker holding its prefix; a prompt whose rest past
    what the decode worker cached (it received the prefix in a handoff) is short is
    prefilled on the decode worker itself; every counter returns to zero."""
    from pdserve.router.kv_aware_policy import KVAwarePolicy
    from pdserve.router.prefix_locator import RoutedPrefixLocator

    ps, ds = [SynthPrefill("p0"), SynthPrefill("p1")], [SynthDecode("d0")]
    policy = KVAwarePolicy(2, RoutedPrefixLocator(2, None),
                           {"p0": "n", "p1": "n", "d0": "n"}, "key")
    lc = RequestLifecycle("disaggregated", ps, ds, policy, conditional_prefill_tokens=3)
    params = SamplingParams(temperature=0, max_tokens=2, seed=1)
    prefix = list(range(1, 21))  # 9 usable blocks of 2: 18 tokens may be cached

    async def go(rid: str, ids: list[int]) -> list[int]:
        out = []
        async for chunk in lc.run(rid, ids, params):
            out += chunk.token_ids
        return out

    prompts = {"a": prefix + [50, 51, 52, 53, 54], "b": prefix + [60, 61, 62, 63, 64],
               "c": prefix + [70]}
    got = {rid: asyncio.run(go(rid, ids)) for rid, ids in prompts.items()}
    assert got == {rid: reference(ids, 2) for rid, ids in prompts.items()}
    on = {r.request_id: p.worker_id for p in ps for r in p.requests}
    assert on["a"] == on["b"]  # back to the worker holding the prefix: 7 tokens to compute
    assert "c" not in on  # 21 tokens, 18 cached on d0: 3 left, prefilled there
    assert [r.request_id for r in ds[0].requests] == ["a", "b", "c"]
    assert all(policy.pending_tokens(w) == 0 for w in ("p0", "p1", "d0"))
    assert set(policy.in_flight.values()) == {0}
