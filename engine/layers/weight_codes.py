"""Weights that are block codes in float32 clothing, found and kept compact for CPU decode.

A GGUF model quantized to Q4_1 or Q8_0 is loaded as float32 (the loader dequantizes every
tensor: `w = d * q + m` per block of 32 weights along a row, with float16 `d` and `m`). The
values are then still exactly such codes, and a CPU decode step, which streams every weight
once, can read 0.625 (Q4_1) or 1.125 (Q8_0) bytes a weight instead of 4. `find_codes` looks
for them in a float32 weight and keeps them only if they rebuild every weight bit for bit:
the model's function does not change, only how its weights are stored for the GEMV
(`csrc/cpu_gemv_codes.cpp`). The float32 weight stays for everything else (prefill rows go
to oneDNN).

The search, per block of 32: Q4_1's offset is the block's minimum (its code 0) and its scale
one of the float16 values next to (max - min) / 15; Q8_0's scale one next to max|w| / 127.
Each candidate scale is tried by rounding every weight to a code and rebuilding it in the
loader's float32 arithmetic ((d * q) + m, two roundings). ~1 s for SmolLM2-135M.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("pdserve.engine")

BLOCK = 32
_ATTR = "_pdserve_codes"  # on the weight tensor: its WeightCodes, or False if it has none
_ROWS_PER_CHUNK = 2048  # rows searched at once (bounds the search's temporaries)


@dataclass(frozen=True, slots=True)
class WeightCodes:
    """A [N, K] weight as blocks of 32 along K: `scales` [N, K/32] float32, `offsets` the
    same (q4) or empty (q8), `codes` uint8 [N, K/2] (q4: byte j of a block holds weight j in
    its low and j + 16 in its high nibble) or int8 [N, K] (q8)."""

    kind: str
    scales: torch.Tensor
    offsets: torch.Tensor
    codes: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.scales, self.offsets, self.codes))

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, as the loader computes it."""
        n, blocks = self.scales.shape
        if self.kind == "q4":
            c = self.codes.view(n, blocks, BLOCK // 2)
            q = torch.cat([c & 0xF, c >> 4], dim=-1).float()
            w = self.scales.unsqueeze(-1) * q + self.offsets.unsqueeze(-1)
        else:
            w = self.codes.view(n, blocks, BLOCK).float() * self.scales.unsqueeze(-1)
        return w.reshape(n, blocks * BLOCK)


def codes_of(weight: torch.Tensor) -> WeightCodes | None:
    """The codes `attach` found for `weight`, or None."""
    found = getattr(weight, _ATTR, None)
    return found or None


def attach(model: torch.nn.Module, weights: list[torch.Tensor]) -> int:
    """Search each weight once and keep the codes found on it; returns the bytes a decode
    step then streams for those weights instead of their float32 bytes."""
    saved, kinds = 0, {"q4": 0, "q8": 0}
    for w in weights:
        if getattr(w, _ATTR, None) is not None:
            continue
        found = find_codes(w.detach())
        setattr(w, _ATTR, found or False)
        if found is not None:
            kinds[found.kind] += 1
            saved += w.numel() * w.element_size() - found.nbytes
    if kinds["q4"] or kinds["q8"]:
        log.info("CPU decode reads %d weights as 4-bit and %d as 8-bit block codes "
                 "(exactly the loaded weights): %.0f MB less a step", kinds["q4"],
                 kinds["q8"], saved / 1e6)
    return saved


def forget(weight: torch.Tensor) -> None:
    """Drop the codes of `weight` (call after changing its values in place)."""
    if hasattr(weight, _ATTR):
        delattr(weight, _ATTR)


def find_codes(w: torch.Tensor) -> WeightCodes | None:
    """Q4_1 or Q8_0 codes that rebuild `w` exactly, else None (float32, 2-D, K % 32 == 0)."""
    if w.dtype != torch.float32 or w.dim() != 2 or w.shape[1] % BLOCK or w.numel() == 0:
        return None
    if not bool(torch.isfinite(w).all()):
        return None
    parts = {"q4": [], "q8": []}
    for kind in ("q4", "q8"):
        for start in range(0, w.shape[0], _ROWS_PER_CHUNK):
            part = _search(w[start:start + _ROWS_PER_CHUNK].contiguous(), kind)
            if part is None:
                parts[kind] = None
                break
            parts[kind].append(part)
        if parts[kind] is not None:
            scales, offsets, codes = (torch.cat(t) for t in zip(*parts[kind]))
            return WeightCodes(kind, scales, offsets if kind == "q4" else offsets[:0], codes)
    return None


def _search(w: torch.Tensor, kind: str) -> tuple[torch.Tensor, ...] | None:
    n, k = w.shape
    b = w.view(n, k // BLOCK, BLOCK)
    if kind == "q4":
        low = b.amin(dim=-1)
        if not torch.equal(low.half().float(), low):
            return None
        guess, top = (b.amax(dim=-1) - low) / 15, 15
    else:
        low = torch.zeros(b.shape[:2])
        guess, top = b.abs().amax(dim=-1) / 127, 127
    scales = torch.full(b.shape[:2], float("nan"))
    codes = torch.zeros(b.shape, dtype=torch.int32)
    todo = torch.ones(b.shape[:2], dtype=torch.bool)
    bits = guess.half().view(torch.int16)
    for step in (0, -1, 1, -2, 2):
        cand = (bits + step).view(torch.float16).float()
        cand = torch.where(cand > 0, cand, torch.zeros_like(cand))
        safe = torch.where(cand > 0, cand, torch.ones_like(cand))
        q = torch.round((b - low.unsqueeze(-1)) / safe.unsqueeze(-1))
        q = q.clamp(0 if kind == "q4" else -128, top)
        q = torch.where(cand.unsqueeze(-1) > 0, q, torch.zeros_like(q))
        rebuilt = cand.unsqueeze(-1) * q
        if kind == "q4":
            rebuilt = rebuilt + low.unsqueeze(-1)
        hit = todo & (rebuilt == b).all(dim=-1)
        scales[hit] = cand[hit]
        codes[hit] = q[hit].to(torch.int32)
        todo &= ~hit
        if not bool(todo.any()):
            break
    if bool(todo.any()):
        return None
    if kind == "q4":
        c = codes.to(torch.uint8)
        packed = (c[..., :BLOCK // 2] | (c[..., BLOCK // 2:] << 4)).reshape(n, k // 2)
        return scales, low.contiguous(), packed.contiguous()
    return scales, low, codes.to(torch.int8).reshape(n, k).contiguous()
