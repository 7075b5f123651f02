"""Turn a batch of logits into next tokens (and logprobs), reproducibly per request.

Randomness is keyed on `(seed, position)` of the token being sampled, never on a
generator's running state. So a seeded request gives the same tokens whichever rows share
its batch, in whatever order, and whichever worker (prefill, decode, a migration target)
samples a given position — the contract in DESIGN.md "Sampling".

Sampling uses the exponential race: with `q_i ~ Exponential(1)` independent,
`argmax_i p_i / q_i` is distributed as `Categorical(p)`. The noise depends only on the
row's key (`step_seed` of its seed and position); everything else is batched tensor ops.

On CUDA the noise comes from torch's generator, on CPU from a hash of the key and the
token id (`race_uniforms`: one hash a token, where the generator's draws took most of a
24-row step), so seeded tokens match across workers of the same device type (CPU with CPU,
CUDA with CUDA), not across types.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pdserve.engine.sampling_params import SamplingParams

_MASK64 = 2**64 - 1
CANDIDATES = 1024  # top tokens ranked exactly before top-k/top-p needs the whole vocabulary


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(seed: int, position: int) -> int:
    """The generator seed for sampling position `position` of a request seeded `seed`.

    Mixed twice so that neighbouring seeds and neighbouring positions give unrelated
    streams (a plain `seed + position` would make request s at position p+1 replay
    request s+1 at position p). Torch's CPU generator keeps only the low 32 bits of a seed;
    splitmix64 mixes every input bit into those, so distinct (seed, position) pairs still
    collide only by chance (about 2**-32).
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64))


_TOKEN_MUL = 0x9E3779B9
_M32 = 0xFFFFFFFF


def race_uniforms(keys: list[int], vocab: int) -> torch.Tensor:
    """[len(keys), vocab] float32 uniforms on (0, 1) for the CPU race: token v of row r from
    a hash of (keys[r], v) alone — 23 random bits, `(2 (h >> 9) + 1) / 2^24`, exact in
    float32 (`csrc/cpu_fused.cpp` `race_uniforms` says how h is mixed). Our CPU kernel where
    it loads, else the same bits from torch's integer ops (slower; same tokens)."""
    from pdserve.engine.layers import cpu_kernels

    signed = [k - (1 << 64) if k >= 1 << 63 else k for k in keys]
    key_t = torch.tensor(signed, dtype=torch.int64)
    if cpu_kernels.load():
        return torch.ops.pdserve.race_uniforms(key_t, vocab)
    lo, hi = (key_t & _M32).unsqueeze(1), ((key_t >> 32) & _M32).unsqueeze(1)
    h = (torch.arange(vocab, dtype=torch.int64) * _TOKEN_MUL + lo) & _M32
    h = _fmix32(_fmix32(h) ^ hi)
    return (((h >> 9) << 1) | 1).float() * 2.0**-24


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser over int64 tensors holding 32-bit words (products wrap;
    only their low 32 bits are kept)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _index(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64, device=device)


@dataclass(slots=True, frozen=True)
class SampleRequest:
    """One row of the logits batch.

    `seed` is always set (the caller resolved `params.seed=None` to a random seed once per
    request). `position` is the index of the token being sampled in the whole sequence
    (`prompt_len + num_generated`); together with `seed` it is the only source of this
    row's randomness.
    """

    params: SamplingParams
    seed: int
    position: int
    num_generated: int
    eos_token_ids: tuple[int, ...]


@dataclass(slots=True)
class SampleResult:
    """The sampled token of one row.

    `logprob` is the sampled token's log-probability under the model's distribution (after
    min_tokens suppression, before temperature/top-k/top-p/min-p), or None when the request
    did not ask for logprobs. `top_logprobs` holds the `params.logprobs` most likely
    `(token_id, logprob)` pairs, most likely first; empty when logprobs is None or 0.
    """

    token_id: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]]


class Sampler:
    """Samples one token per row of a `[B, V]` logits batch.

    Invariants:
    - a row's token depends only on its logits row and its `SampleRequest` — not on the
      other rows, their order, or this object's history (a fresh `Sampler` on another
      worker continues a request identically, given the same device type);
    - greedy rows (temperature 0) take the argmax, lowest token id on ties;
    - while `num_generated < min_tokens`, EOS ids (even with `ignore_eos`) and
      `stop_token_ids` cannot be sampled and have logprob -inf;
    - results reach the host in one transfer per call;
    - the logits passed in are never written (a CUDA-graph step hands its static output).
    """

    def __init__(self) -> None:
        # One generator per device, re-seeded for every row: reusing the object is safe
        # because `manual_seed` resets its whole state.
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: list[SampleRequest]) -> list[SampleResult]:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [len(rows)={len(rows)}, vocab], got {tuple(logits.shape)}"
            )
        if not rows:
            return []
        # No copy of the logits unless stop tokens must be masked (the caller's tensor is
        # never written): a step's logits are rows x vocab floats, megabytes at batch 24.
        x = self._suppress_stops(logits.float(), rows)

        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not drawn:
            tokens = x.argmax(dim=-1)
        elif not greedy:
            tokens = self._sample_random(x, rows)
        else:
            tokens = torch.empty(len(rows), dtype=torch.int64, device=x.device)
            g_idx, d_idx = _index(greedy, x.device), _index(drawn, x.device)
            tokens[g_idx] = x[g_idx].argmax(dim=-1)
            tokens[d_idx] = self._sample_random(x[d_idx], [rows[i] for i in drawn])

        # Pack everything into one float64 tensor (exact for token ids and for float32
        # logprobs) so the host sees one transfer instead of one per output.
        packed = [tokens.to(torch.float64)]
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        top_n = min(max((rows[i].params.logprobs or 0 for i in want), default=0), x.shape[1])
        if want:
            if len(want) == len(rows):
                logp, want_tokens = torch.log_softmax(x, dim=-1), tokens
            else:
                idx = _index(want, x.device)
                logp, want_tokens = torch.log_softmax(x[idx], dim=-1), tokens[idx]
            packed.append(logp.gather(1, want_tokens.unsqueeze(1)).squeeze(1).double())
            if top_n:
                top = logp.topk(top_n, dim=-1)
                packed.append(top.indices.flatten().double())
                packed.append(top.values.flatten().double())
        host = torch.cat(packed).tolist()
        return self._unpack(host, rows, want, top_n)

    @staticmethod
    def _suppress_stops(x: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
        """`x`, or a copy of it with the stop ids of rows short of min_tokens at -inf."""
        vocab = x.shape[1]
        row_ids: list[int] = []
        tok_ids: list[int] = []
        for i, r in enumerate(rows):
            if r.num_generated >= r.params.min_tokens:
                continue
            for t in (*r.eos_token_ids, *r.params.stop_token_ids):
                if not 0 <= t < vocab:
                    raise ValueError(f"stop/eos token id {t} outside vocab of size {vocab}")
                row_ids.append(i)
                tok_ids.append(t)
        if not row_ids:
            return x
        x = x.clone()
        x[_index(row_ids, x.device), _index(tok_ids, x.device)] = float("-inf")
        return x

    def _sample_random(self, x: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then the exponential race; returns [n] ids."""
        n, vocab = x.shape
        device = x.device
        params = [r.params for r in rows]
        temps = torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
        # Shift by the row max before dividing: with a tiny temperature the other logits
        # then underflow to -inf instead of the max overflowing to +inf (softmax -> nan).
        # After the shift the top token's scaled logit is exactly 0, which min-p uses.
        row_max = x.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        scaled = torch.sub(x, row_max).div_(temps)  # ours: the masks below write in place

        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        if any(k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
            drop = self._outside_top_k_top_p(x, scaled, row_max, temps, top_k, top_p)
            scaled.masked_fill_(drop, float("-inf"))

        min_p = [p.min_p for p in params]
        if any(m > 0.0 for m in min_p):
            # p_i < min_p * p_max  <=>  scaled_i < log(min_p), as the top token's scaled
            # logit is 0 and temperature-scaled logits are log-probs up to that shift.
            log_min_p = torch.tensor(min_p, device=device).log().unsqueeze(1)
            scaled.masked_fill_(scaled < log_min_p, float("-inf"))

        keys = [step_seed(r.seed, r.position) for r in rows]
        if device.type == "cpu":
            # q = -log(u), u uniform on (0, 1): one hash a token instead of a generator's
            # draw (torch's CPU `exponential_` costs ~15 ns a token: ~18 ms for 24 rows of
            # SmolLM2's 49k vocabulary, most of a step).
            noise = race_uniforms(keys, vocab).log_().neg_()
        else:
            noise = torch.empty_like(scaled)
            gen = self._generator(device)
            for i, key in enumerate(keys):
                gen.manual_seed(key)
                noise[i].exponential_(generator=gen)
        # argmax(p / q) == argmax(log p - log q); the log form cannot overflow for tiny q,
        # and the clamp guards against an exact 0 draw.
        noise.clamp_min_(torch.finfo(torch.float32).tiny)
        return scaled.sub_(noise.log_()).argmax(dim=-1)

    @staticmethod
    def _outside_top_k_top_p(x: torch.Tensor, scaled: torch.Tensor, row_max: torch.Tensor,
                             temps: torch.Tensor, top_k: list[int],
                             top_p: list[float]) -> torch.Tensor:
        """[n, V] bool: the tokens top-k and top-p drop (none in a row that asks for neither).

        Tokens rank on the unscaled logits (division can round distinct logits together),
        equal logits the lower id first, as argmax does: top_k=1 is then exactly greedy.
        top-p keeps a token while the mass ranked above it is still short of top_p: the
        smallest prefix reaching top_p, and the top token always (rows with top_p == 1 skip
        it, since rounding can push the running sum to 1 early). Ranking the whole
        vocabulary is one sort of V logits a row (~1 ms for SmolLM2's 49k on a CPU core); on
        CPU the top `CANDIDATES` (or the largest top_k; with no top-p, just the largest
        top_k) ranked exactly decide every row whose kept set ends inside them — almost
        every row of a trained model — and the full sort runs only when one does not, or
        when equal logits straddle the cut.
        """
        n, vocab = x.shape
        device = x.device
        k_t = torch.tensor(top_k, device=device).unsqueeze(1)
        p_t = torch.tensor(top_p, device=device).unsqueeze(1)
        nucleus = any(p < 1.0 for p in top_p)
        # Without top-p the largest top_k ranks enough; top-p needs the candidates' mass.
        width = min(vocab, max([CANDIDATES if nucleus else 1,
                                *(k for k in top_k if k < vocab)]))
        if width < vocab and device.type == "cpu":  # on a GPU the sort is cheap, a sync not
            vals, idx = x.topk(width, dim=-1)
            cut = vals[:, -1:]
            if bool((torch.count_nonzero(x >= cut, dim=-1) == width).all()):
                # Lower ids first among equal logits, as a stable sort of the whole row.
                by_id = idx.argsort(dim=-1)
                vals, idx = vals.gather(1, by_id), idx.gather(1, by_id)
                vals, order = vals.sort(dim=-1, descending=True, stable=True)
                idx = idx.gather(1, order)
                # The normaliser is over every token top-k keeps, inside the candidates or not
                # (`scaled` = (x - row_max) / temps, not yet masked); only top-p needs it.
                if not nucleus:
                    lse = None
                elif all(k >= vocab for k in top_k):
                    lse = scaled.logsumexp(dim=-1, keepdim=True)
                else:
                    keep_all = (k_t >= vocab).expand(n, vocab).clone()
                    ranked = torch.arange(width, device=device).unsqueeze(0) < k_t
                    keep_all.scatter_(1, idx, ranked)
                    lse = scaled.masked_fill(~keep_all, float("-inf")).logsumexp(
                        dim=-1, keepdim=True)
                drop, mass = Sampler._rank_drop(vals, row_max, temps, k_t, p_t, lse)
                free = (k_t >= vocab) & (p_t >= 1.0)  # rows that drop nothing
                # Every token past the candidates is dropped: by top-k, or by top-p because
                # the candidates' mass already reaches top_p.
                decided = (k_t <= width) | free
                if mass is not None:
                    decided |= (p_t < 1.0) & (mass >= p_t)
                if bool(decided.all()):
                    full = torch.ones_like(x, dtype=torch.bool).scatter_(1, idx, drop)
                    return full.bitwise_and_(~free)
        sorted_x, sorted_idx = _sort_descending(x)
        drop, _ = Sampler._rank_drop(sorted_x, row_max, temps, k_t, p_t, None)
        return torch.zeros_like(drop).scatter(1, sorted_idx, drop)

    @staticmethod
    def _rank_drop(sorted_x: torch.Tensor, row_max: torch.Tensor, temps: torch.Tensor,
                   k_t: torch.Tensor, p_t: torch.Tensor,
                   lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drop mask over ranked logits `sorted_x` [n, W], and the probability mass of the
        W ranks that top-k keeps ([n, 1]; None without top-p). `lse`: the log of the mass
        top-k keeps when W is not the whole vocabulary (None: the softmax over `sorted_x`)."""
        sorted_vals = (sorted_x - row_max) / temps
        ranks = torch.arange(sorted_x.shape[1], device=sorted_x.device).unsqueeze(0)
        drop = ranks >= k_t
        mass = None
        if bool((p_t < 1.0).any()):
            masked = sorted_vals.masked_fill(drop, float("-inf"))
            probs = masked.softmax(dim=-1) if lse is None else (masked - lse).exp()
            running = probs.cumsum(dim=-1)
            mass = running[:, -1:]
            drop |= (running - probs >= p_t) & (p_t < 1.0)
        return drop, mass

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen

    @staticmethod
    def _unpack(
        host: list[float], rows: list[SampleRequest], want: list[int], top_n: int
    ) -> list[SampleResult]:
        b = len(rows)
        results = [SampleResult(int(t), None, []) for t in host[:b]]
        lps = host[b : b + len(want)]
        ids_at = b + len(want)
        vals_at = ids_at + len(want) * top_n
        for j, i in enumerate(want):
            res = results[i]
            res.logprob = lps[j]
            n = min(rows[i].params.logprobs or 0, top_n)
            start = j * top_n
            res.top_logprobs = [
                (int(host[ids_at + start + k]), host[vals_at + start + k]) for k in range(n)
            ]
        return results


def _sort_descending(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row of `x` sorted descending and the ids, equal values lower id first: exactly
    `x.sort(dim=-1, descending=True, stable=True)` (-0.0 and 0.0 count as equal).

    On CPU torch's stable sort takes ~4 ms for a 49k row; this sorts one int64 key a token
    instead — the value's bits mapped to an integer of the same order in the high half, the
    id in the low half — with numpy's vectorised quicksort (~1 ms): keys are distinct, so
    an unstable sort gives the stable order."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return x.sort(dim=-1, descending=True, stable=True)
    ascending = ((-x) + 0.0).numpy()  # descending order of x; + 0.0 turns -0.0 into 0.0
    bits = ascending.view(np.int32).astype(np.int64)
    # A negative float's bits order backwards as an int: flip all but the sign.
    bits = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    keys = (bits << 32) | np.arange(x.shape[-1], dtype=np.int64)
    keys.sort(axis=-1)
    idx = torch.from_numpy(keys & 0xFFFFFFFF)
    return x.gather(-1, idx), idx
