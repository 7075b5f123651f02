"""Weights that are block codes in float32 clothing, found and kept compact for CPU decode.

A GGUF model quantized to Q4_1 or Q8_0 is loaded as float32 (the loader dequantizes every
tensor: `w = d * q + m` per block of 32 weights along a row, with float16 `d` and `m`). The
values are then still exactly such codes, and a CPU decode step, which streams every weight
once, can read 0.625 (Q4_1) or 1.125 (Q8_0) bytes a weight instead of 4. `find_codes` looks
for them in a float32 weight and keeps them only if they rebuild every weight bit for bit:
the model's function does not change, only how its weights are stored for the products
(`csrc/cpu_gemv_codes.cpp` for decode rows, `csrc/cpu_gemm_codes.cpp` past 16 rows; on
AVX-512 hosts `csrc/codes_lanes_avx512.cpp` over a copy packed by `to_lanes`). The
float32 weight stays for everything else (CUDA, `PDSERVE_WEIGHT_CODES=0`); oneDNN's packed
copy of it is then never made (SmolLM2-135M after a prefill: 1.50 -> 1.09 GB resident).

The search, per block of 32: Q4_1's offset is the block's minimum (its code 0) and its scale
one of the float16 values next to (max - min) / 15; Q8_0's scale one next to max|w| / 127.
Each candidate scale is tried by rounding every weight to a code and rebuilding it in the
loader's float32 arithmetic ((d * q) + m, two roundings). ~3 s for SmolLM2-135M on one
core, so what a search found is kept on disk (`$PDSERVE_CACHE_DIR/codes`, safetensors),
named by a fingerprint of the weights; a later start rebuilds each weight from the kept
codes and uses them only if every value matches (under a second), else searches again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("pdserve.engine")

BLOCK = 32
_ATTR = "_pdserve_codes"  # on the weight tensor: its WeightCodes, or False if it has none
_LANES_ATTR = "_pdserve_lanes"  # on the weight tensor: its LaneCodes, once made
_ROWS_PER_CHUNK = 2048  # rows searched at once (bounds the search's temporaries)
_CACHE_FORMAT = 1  # part of a kept file's name: a new layout never reads an old file
_SAMPLES = 4096  # values of each weight in its fingerprint


def cache_root() -> Path:
    """Where pdserve keeps what it builds once per machine (kernels, weight codes)."""
    return Path(os.environ.get("PDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pdserve")


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
    """Find each weight's codes once (kept from an earlier start where they still rebuild
    it exactly, else searched) and keep them on it; returns the bytes a decode step then
    streams for those weights instead of their float32 bytes."""
    todo = [w for w in weights if getattr(w, _ATTR, None) is None]
    if not todo:
        return 0
    path = cache_root() / "codes" / f"{_fingerprint(todo)}-v{_CACHE_FORMAT}.safetensors"
    kept = _read_kept(path, len(todo))
    searched = False
    for i, w in enumerate(todo):
        if kept is None or (kept[i] is not None and not _rebuilds(kept[i], w.detach())):
            found, searched = find_codes(w.detach()), True
        else:  # a weight kept as having no codes is trusted: at worst it stays float32
            found = kept[i]
        setattr(w, _ATTR, found or False)
    if searched:
        _keep(path, [getattr(w, _ATTR) or None for w in todo])
    saved, kinds = 0, {"q4": 0, "q8": 0}
    for w in todo:
        found = getattr(w, _ATTR) or None
        if found is not None:
            kinds[found.kind] += 1
            saved += w.numel() * w.element_size() - found.nbytes
    if kinds["q4"] or kinds["q8"]:
        log.info("CPU decode reads %d weights as 4-bit and %d as 8-bit block codes "
                 "(exactly the loaded weights): %.0f MB less a step", kinds["q4"],
                 kinds["q8"], saved / 1e6)
    return saved


def _rebuilds(codes: WeightCodes, w: torch.Tensor) -> bool:
    """Whether kept `codes` give back every value of `w` (False for codes of another shape)."""
    try:
        return torch.equal(codes.dequantize(), w)
    except (RuntimeError, ValueError):  # shapes that do not fit together
        return False


def _fingerprint(weights: list[torch.Tensor]) -> str:
    """Names a set of weights by their shapes and a strided sample of their values: a
    different model or shard gets another name; a collision costs only a search (the kept
    codes are checked against every value before use)."""
    h = hashlib.sha256()
    for w in weights:
        flat = w.detach().reshape(-1)
        h.update(repr((tuple(w.shape), str(w.dtype))).encode())
        step = max(1, flat.numel() // _SAMPLES)
        h.update(flat[::step].contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def _read_kept(path: Path, count: int) -> list[WeightCodes | None] | None:
    """The codes kept at `path` for `count` weights (None a weight had none), or None."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            kinds = json.loads((f.metadata() or {}).get("kinds", "null"))
            if not isinstance(kinds, list) or len(kinds) != count:
                return None
            return [WeightCodes(kind, *(f.get_tensor(f"{i}.{part}")
                                        for part in ("scales", "offsets", "codes")))
                    if kind in ("q4", "q8") else None for i, kind in enumerate(kinds)]
    except (OSError, SafetensorError, ValueError, KeyError) as e:
        if path.exists():
            log.warning("weight codes kept at %s unreadable (%s): searching again", path, e)
        return None


def _keep(path: Path, found: list[WeightCodes | None]) -> None:
    """Write the codes found, whole or not at all (a reader never sees a partial file)."""
    from safetensors.torch import save_file

    tensors = {}
    for i, c in enumerate(found):
        if c is not None:
            tensors.update({f"{i}.scales": c.scales, f"{i}.offsets": c.offsets,
                            f"{i}.codes": c.codes})
    kinds = json.dumps([c.kind if c is not None else None for c in found])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            part = Path(tmp) / path.name
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(part),
                      metadata={"kinds": kinds})
            os.replace(part, path)
    except OSError as e:  # a read-only home: every start searches, nothing else changes
        log.warning("could not keep the weight codes at %s: %s", path, e)


def forget(weight: torch.Tensor) -> None:
    """Drop the codes of `weight` (call after changing its values in place)."""
    for attr in (_ATTR, _LANES_ATTR):
        if hasattr(weight, attr):
            delattr(weight, attr)


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


LANES = 16  # output rows a tile of the lanes layout holds (one AVX-512 vector)


@dataclass(frozen=True, slots=True)
class LaneCodes:
    """`WeightCodes` packed for `csrc/codes_lanes_avx512.cpp`: tiles of 16 output rows, so
    one vector holds one column of a tile. `scales` [G, K/32, 16] float32, `offsets` the same
    (q4) or empty (q8), `codes` [G, K/32, 32, 16] int8 (q8) or [G, K/32, 16, 16] uint8 (q4:
    byte j of a row holds columns j and j + 16 of its block, as in `WeightCodes`); rows past
    `n` (the last tile's padding) are zeros."""

    kind: str
    n: int
    scales: torch.Tensor
    offsets: torch.Tensor
    codes: torch.Tensor


def lanes_of(weight: torch.Tensor) -> LaneCodes | None:
    """The codes `attach` found for `weight` in the lanes layout (made on first call and kept
    on the weight), or None where it has no codes."""
    lanes = getattr(weight, _LANES_ATTR, None)
    if lanes is None:
        codes = codes_of(weight)
        if codes is None:
            return None
        lanes = to_lanes(codes)
        setattr(weight, _LANES_ATTR, lanes)
    return lanes


def to_lanes(codes: WeightCodes) -> LaneCodes:
    """The same codes in the lanes layout (a copy; the row layout stays for the rest)."""
    n, blocks = codes.scales.shape
    tiles = -(-n // LANES)
    pad = tiles * LANES - n

    def tiled(t: torch.Tensor) -> torch.Tensor:  # [n, blocks, ...] -> [tiles, blocks, ..., 16]
        t = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) if pad else t
        t = t.reshape(tiles, LANES, *t.shape[1:])
        return t.movedim(1, -1).contiguous()

    scales = tiled(codes.scales)
    offsets = tiled(codes.offsets) if codes.kind == "q4" else codes.offsets
    width = BLOCK // 2 if codes.kind == "q4" else BLOCK
    packed = tiled(codes.codes.view(n, blocks, width))
    return LaneCodes(codes.kind, n, scales, offsets, packed)
