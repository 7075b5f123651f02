"""Sampler and SamplingParams behaviour: validation, filters, reproducibility, logprobs."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from pdserve.engine import sampler as sampler_module
from pdserve.engine.sampler import Sampler, SampleRequest
from pdserve.engine.sampling_params import SamplingParams

V = 64


def req(
    params: SamplingParams | None = None,
    seed: int = 0,
    position: int = 10,
    num_generated: int = 0,
    eos: tuple[int, ...] = (),
) -> SampleRequest:
    return SampleRequest(params or SamplingParams(), seed, position, num_generated, eos)


def random_logits(b: int, v: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int) -> list[int]:
    """Sample the same logits row under n different seeds, in one batch."""
    logits = logits_row.unsqueeze(0).expand(n, -1)
    rows = [req(params, seed=s) for s in range(n)]
    return [r.token_id for r in Sampler()(logits, rows)]


# --- SamplingParams ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "16"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 4.0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": False}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [1.0]}, "stop_token_ids"),
        ({"stop_token_ids": 2}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_invalid_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_temperature_error_shows_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"temperature must be >= 0.*got -1\.0"):
        SamplingParams(temperature=-1.0)


def test_params_normalise_containers_and_greedy() -> None:
    p = SamplingParams(stop=["a", "bc"], stop_token_ids=[3, 4], temperature=0)
    assert p.stop == ("a", "bc") and p.stop_token_ids == (3, 4)
    assert p.greedy and isinstance(p.temperature, float)
    assert SamplingParams(stop="END").stop == ("END",)
    assert not SamplingParams(temperature=0.5).greedy


def test_params_dict_round_trip_through_json() -> None:
    p = SamplingParams(
        max_tokens=7,
        min_tokens=2,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        seed=2**64 - 1,
        stop=("x",),
        stop_token_ids=(5,),
        ignore_eos=True,
        logprobs=3,
    )
    back = SamplingParams.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back == p
    assert SamplingParams.from_dict({}) == SamplingParams()


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="temprature"):
        SamplingParams.from_dict({"temprature": 0.5})


def test_validate_against_vocab() -> None:
    SamplingParams(stop_token_ids=(V - 1,)).validate_against(V)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=(V,)).validate_against(V)


# --- Sampler: greedy and filters -----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype: torch.dtype) -> None:
    logits = random_logits(8).to(dtype)
    out = Sampler()(logits, [req(SamplingParams(temperature=0)) for _ in range(8)])
    assert [r.token_id for r in out] == logits.float().argmax(-1).tolist()


def test_greedy_ties_take_lowest_id() -> None:
    logits = torch.zeros(1, V)
    logits[0, [9, 3, 40]] = 5.0
    assert Sampler()(logits, [req(SamplingParams(temperature=0))])[0].token_id == 3


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.0, 50.0])
def test_top_k_1_is_greedy(temperature: float) -> None:
    logits = random_logits(16, seed=1)
    params = SamplingParams(temperature=temperature, top_k=1)
    out = Sampler()(logits, [req(params, seed=s) for s in range(16)])
    assert [r.token_id for r in out] == logits.argmax(-1).tolist()


def test_top_k_1_breaks_ties_like_argmax() -> None:
    logits = torch.zeros(1, 1000)
    logits[0, [700, 123, 999, 500]] = 5.0
    drawn = draw_many(logits[0], SamplingParams(temperature=1.0, top_k=1), 20)
    assert set(drawn) == {123}


def test_top_k_never_samples_outside_top_k() -> None:
    row = random_logits(1, seed=2)[0]
    allowed = set(row.topk(5).indices.tolist())
    # A high temperature flattens the distribution, so ignoring top_k would show quickly.
    drawn = draw_many(row, SamplingParams(temperature=5.0, top_k=5), 500)
    assert set(drawn) == allowed


def nucleus_logits() -> torch.Tensor:
    return torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04]).log()


@pytest.mark.parametrize(("top_p", "nucleus"), [(0.3, {0}), (0.7, {0, 1}), (0.8, {0, 1, 2})])
def test_top_p_restricts_to_nucleus(top_p: float, nucleus: set[int]) -> None:
    drawn = draw_many(nucleus_logits(), SamplingParams(top_p=top_p), 400)
    assert set(drawn) == nucleus


def test_top_p_applies_after_temperature() -> None:
    # At temperature 0.5 the probs become ~[0.71, 0.18, 0.06, ...]: 0.7 needs only token 0.
    drawn = draw_many(nucleus_logits(), SamplingParams(temperature=0.5, top_p=0.7), 200)
    assert set(drawn) == {0}


@pytest.mark.parametrize(("min_p", "kept"), [(0.3, {0, 1, 2}), (0.5, {0, 1}), (0.0, set(range(5)))])
def test_min_p_drops_unlikely_tokens(min_p: float, kept: set[int]) -> None:
    logits = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05]).log()
    drawn = draw_many(logits, SamplingParams(min_p=min_p), 600)
    assert set(drawn) == kept


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sample_frequencies_match_softmax(temperature: float) -> None:
    logits = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3, -1.0])
    n = 4000
    drawn = draw_many(logits, SamplingParams(temperature=temperature), n)
    expected = torch.softmax(logits / temperature, -1) * n
    observed = torch.bincount(torch.tensor(drawn), minlength=6).float()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # 5 degrees of freedom: P(chi2 > 20.5) = 0.001. Seeds are fixed, so this is deterministic.
    assert chi2 < 20.5, (observed.tolist(), expected.tolist())


# --- Sampler: reproducibility --------------------------------------------------------------


def mixed_rows() -> list[SampleRequest]:
    return [
        req(SamplingParams(temperature=1.0), seed=11, position=5),
        req(SamplingParams(temperature=0.8, top_k=20), seed=12, position=9),
        req(SamplingParams(temperature=1.3, top_p=0.9), seed=13, position=2),
        req(SamplingParams(temperature=0.0), seed=14, position=7),
        req(SamplingParams(temperature=1.0, min_p=0.05, logprobs=2), seed=15, position=30),
    ]


def test_seeded_sampling_reproducible_across_calls_and_instances() -> None:
    logits = random_logits(5, seed=3) / 3  # flat enough that draws vary
    rows = mixed_rows()
    sampler = Sampler()
    first = [r.token_id for r in sampler(logits, rows)]
    again = [r.token_id for r in sampler(logits, rows)]
    fresh = [r.token_id for r in Sampler()(logits, rows)]
    assert first == again == fresh


def test_batch_composition_does_not_change_a_row() -> None:
    logits = random_logits(5, seed=4) / 3
    rows = mixed_rows()
    alone = [Sampler()(logits[i : i + 1], [rows[i]])[0].token_id for i in range(5)]
    order = [3, 0, 4, 2, 1]
    shuffled = Sampler()(logits[order], [rows[i] for i in order])
    assert {i: r.token_id for i, r in zip(order, shuffled, strict=True)} == dict(enumerate(alone))


def test_positions_and_seeds_give_different_draws() -> None:
    logits = torch.zeros(1, 1000)  # uniform: only the noise decides
    sampler = Sampler()
    by_position = {sampler(logits, [req(seed=7, position=p)])[0].token_id for p in range(50)}
    by_seed = {sampler(logits, [req(seed=s, position=3)])[0].token_id for s in range(50)}
    # Fifty uniform draws over 1000 tokens almost surely give > 40 distinct values.
    assert len(by_position) > 40 and len(by_seed) > 40


def test_continuing_on_a_fresh_sampler_gives_the_same_tokens() -> None:
    # A request sampled for 12 steps on one worker, versus handed over to another after 5.
    logits = random_logits(12, seed=5) / 3
    params = SamplingParams(temperature=0.9, top_p=0.95)
    rows = [req(params, seed=99, position=20 + k, num_generated=k) for k in range(12)]
    one = Sampler()
    whole = [one(logits[k : k + 1], [rows[k]])[0].token_id for k in range(12)]
    first, second = Sampler(), Sampler()
    split = [first(logits[k : k + 1], [rows[k]])[0].token_id for k in range(5)]
    split += [second(logits[k : k + 1], [rows[k]])[0].token_id for k in range(5, 12)]
    assert whole == split
    assert len(set(whole)) > 1  # the draws do vary with position


def test_the_cpu_race_uniforms_are_the_same_bits_with_and_without_our_kernel() -> None:
    """The kernel and the torch fallback agree bit for bit (a vocabulary that is no multiple
    of the kernel's vector takes its scalar tail too), every draw lies strictly inside
    (0, 1), and a row's draws look uniform and depend on its key alone."""
    from pdserve.engine.layers import cpu_kernels

    keys = [0, 1, 2**63, 2**64 - 1, sampler_module.step_seed(5, 9)]
    vocab = 4099
    if not cpu_kernels.load():
        pytest.skip("no CPU kernels on this host: only the fallback runs")
    ours = sampler_module.race_uniforms(keys, vocab)
    cpu_kernels.set_enabled(False)
    try:
        fallback = sampler_module.race_uniforms(keys, vocab)
    finally:
        cpu_kernels.set_enabled(True)
    assert torch.equal(ours, fallback)
    assert float(ours.min()) > 0.0 and float(ours.max()) < 1.0
    assert torch.equal(sampler_module.race_uniforms(keys[3:4], vocab)[0], ours[3])
    for row in ours:  # ten equal bins: chi2 with 9 degrees of freedom, P(> 27.9) = 0.001
        counts = torch.histc(row, bins=10, min=0.0, max=1.0)
        chi2 = float(((counts - vocab / 10) ** 2 / (vocab / 10)).sum())
        assert chi2 < 27.9, counts.tolist()
    assert not torch.equal(ours[0], ours[1])


# --- Sampler: min_tokens and logprobs ------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_suppresses_eos_and_stop_ids(temperature: float, ignore_eos: bool) -> None:
    logits = torch.zeros(1, V)
    logits[0, 2] = 100.0  # eos
    logits[0, 5] = 90.0  # stop token
    logits[0, 8] = 10.0
    params = SamplingParams(
        temperature=temperature, min_tokens=3, stop_token_ids=(5,), ignore_eos=ignore_eos
    )
    sampler = Sampler()
    early = sampler(logits, [req(params, num_generated=2, eos=(2,))])[0]
    assert early.token_id == 8
    late = sampler(logits, [req(params, num_generated=3, eos=(2,))])[0]
    assert late.token_id == 2


def test_logprobs_are_raw_log_softmax() -> None:
    logits = random_logits(3, seed=6)
    rows = [
        req(SamplingParams(temperature=0.5, top_k=3, logprobs=5), seed=1),
        req(SamplingParams(temperature=0.0, logprobs=0)),
        req(SamplingParams(temperature=1.0)),
    ]
    out = Sampler()(logits, rows)
    ref = torch.log_softmax(logits, -1)

    assert out[0].logprob == pytest.approx(ref[0, out[0].token_id].item(), abs=1e-6)
    top = ref[0].topk(5)
    assert [t for t, _ in out[0].top_logprobs] == top.indices.tolist()
    vals = [lp for _, lp in out[0].top_logprobs]
    assert vals == sorted(vals, reverse=True)
    assert vals == pytest.approx(top.values.tolist(), abs=1e-6)

    assert out[1].logprob == pytest.approx(ref[1].max().item(), abs=1e-6)
    assert out[1].top_logprobs == []
    assert out[2].logprob is None and out[2].top_logprobs == []


def test_logprobs_see_min_tokens_suppression() -> None:
    logits = random_logits(1, seed=7)
    logits[0, 4] = 20.0
    params = SamplingParams(temperature=0, min_tokens=1, logprobs=2)
    res = Sampler()(logits, [req(params, eos=(4,))])[0]
    masked = logits.clone()
    masked[0, 4] = float("-inf")
    ref = torch.log_softmax(masked, -1)[0]
    assert res.token_id != 4 and 4 not in [t for t, _ in res.top_logprobs]
    assert res.logprob == pytest.approx(ref[res.token_id].item(), abs=1e-6)
    assert math.isclose(sum(math.exp(v) for v in ref.tolist()), 1.0, rel_tol=1e-5)


def test_empty_batch_and_shape_mismatch() -> None:
    assert Sampler()(torch.zeros(0, V), []) == []
    with pytest.raises(ValueError, match="logits"):
        Sampler()(torch.zeros(2, V), [req()])


def test_random_seed_values_in_full_range_work() -> None:
    rng = random.Random(0)
    rows = [req(seed=rng.randrange(2**64)) for _ in range(4)] + [req(seed=2**64 - 1)]
    out = Sampler()(random_logits(5), rows)
    assert all(0 <= r.token_id < V for r in out)


def _full_sort_tokens(logits: torch.Tensor, rows: list[SampleRequest],
                      monkeypatch: pytest.MonkeyPatch) -> list[int]:
    with monkeypatch.context() as m:
        m.setattr(sampler_module, "CANDIDATES", logits.shape[1])  # rank the whole row
        return [r.token_id for r in Sampler()(logits, rows)]


@pytest.mark.parametrize("spread", [0.5, 3.0, 12.0])
def test_ranking_the_top_candidates_equals_sorting_the_whole_vocabulary(
        spread: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Top-k / top-p decided from the top CANDIDATES tokens give the tokens the full sort
    gives, row by row, for peaked and flat rows (a flat row's nucleus runs past the
    candidates and falls back), rows without either limit, and mixed batches."""
    vocab = 6000
    gen = torch.Generator().manual_seed(int(spread * 10))
    logits = torch.randn(12, vocab, generator=gen) * spread
    configs = [dict(top_p=0.9), dict(top_p=0.5, top_k=50), dict(top_k=7), dict(top_p=0.99),
               dict(), dict(top_k=2000), dict(top_p=0.3, temperature=0.3)]
    for trial in range(6):
        rows = [SampleRequest(SamplingParams(**{"temperature": 1.0, **configs[(i + trial) % 7]}),
                              seed=100 * trial + i, position=5, num_generated=0,
                              eos_token_ids=())
                for i in range(12)]
        got = [r.token_id for r in Sampler()(logits, rows)]
        assert got == _full_sort_tokens(logits, rows, monkeypatch)


def test_equal_logits_across_the_candidate_cut_fall_back_to_the_full_sort(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal logits straddling the cut: topk may keep any of them, the stable full sort
    keeps the lowest ids; top_k at the cut must keep exactly those."""
    monkeypatch.setattr(sampler_module, "CANDIDATES", 4)
    logits = torch.full((2, 400), -5.0)
    logits[:, [300, 310, 320, 2]] = torch.tensor([9.0, 9.0, 9.0, 8.0])
    tied = list(range(40, 240, 5))  # 40 equal logits for ranks 4..43
    logits[:, tied] = 1.0
    top_k = [6, 400]
    x = logits.clone()
    row_max = x.amax(dim=-1, keepdim=True)
    drop = Sampler._outside_top_k_top_p(x, x - row_max, row_max, torch.ones(2, 1), top_k,
                                        [1.0, 1.0])
    assert set(torch.nonzero(~drop[0]).flatten().tolist()) == {2, 300, 310, 320, 40, 45}
    assert not drop[1].any()  # no limit: nothing dropped


def test_the_cpu_full_sort_equals_torchs_stable_sort() -> None:
    """The key sort the full-vocabulary fallback uses on CPU orders rows exactly as
    `sort(descending=True, stable=True)`: values, then ids among equal values — many ties,
    -0.0 beside 0.0, infinities, subnormals, a vocabulary past 2^16."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(6, 70000, generator=gen) * 4
    x[0, ::7] = x[0, 3]  # 10,000 equal logits
    x[1, 100:300] = 0.0
    x[1, 200:250] = -0.0
    x[2, :500] = float("-inf")
    x[2, 600] = float("inf")
    x[3] = torch.randint(-3, 3, (70000,), generator=gen).float()  # six values only
    x[4, 10:20] = torch.tensor(1e-42)  # subnormal, and its negative
    x[4, 20:30] = torch.tensor(-1e-42)
    want_vals, want_idx = x.sort(dim=-1, descending=True, stable=True)
    got_vals, got_idx = sampler_module._sort_descending(x)
    assert torch.equal(got_idx, want_idx)
    assert torch.equal(got_vals, want_vals)
    strided = x[:, ::2]  # a view, as rows picked out of a step's logits can be
    assert torch.equal(sampler_module._sort_descending(strided)[1],
                       strided.sort(dim=-1, descending=True, stable=True)[1])
