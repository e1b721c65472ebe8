"""The linear layers as the GGUF's own blocks: exact weights at a quarter of fp32's bytes (CPU, AVX2).

The packaged SmolLM2 ships as a Q4_1 GGUF (token embedding and tied head Q8_0); transformers de-quantises
it to fp32, so every row of every weight is still made of blocks of 32 values `d * q + m` (Q4_1: fp16
d and m, q in 0..15) or `d * q` (Q8_0: fp16 d, int8 q). `derive` recovers those blocks from the fp32
weights and checks that they rebuild every weight bit for bit; `kernels.cpp` multiplies with them
directly: ~0.6 bytes a weight read instead of 4 (fp32) or 2 (fp16), weights equal to the loaded fp32
ones, fp32 sums. Unlike fbgemm's fp16 weights this changes no weight, and a row's output does not
depend on how many rows the call has.

The GEMMs are the engine's own C++ (kernels.py builds and loads them).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

BLOCK = 32


@dataclass
class Blocks:
    """One weight matrix (out x in) as blocks: `q` uint8 (out, in/2) for Q4_1 or int8 (out, in) for Q8_0;
    `d`, `m` float32 (out, in/32), `m` None for Q8_0."""

    kind: str  # "q4_1" or "q8_0"
    q: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * BLOCK

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.m) if t is not None)


def _fp16_candidates(value: torch.Tensor) -> list[torch.Tensor]:
    """value rounded to fp16, and its two fp16 neighbours (the stored scale is one of them)."""
    half = value.half()
    bits = half.view(torch.int16)
    return [half.float(), (bits + 1).view(torch.float16).float(), (bits - 1).view(torch.float16).float()]


def _solve(values: torch.Tensor, scales: list[torch.Tensor], offset: torch.Tensor | None, low: int, high: int
           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per block, the first scale d whose integers q (in low..high) give back every value bit for bit as
    d * q (+ offset); None if some block has none."""
    found = torch.zeros(values.shape[:-1], dtype=torch.bool)
    d_out = torch.zeros(values.shape[:-1])
    q_out = torch.zeros(values.shape, dtype=torch.int16)
    base = values if offset is None else values - offset[..., None]
    for d in scales:
        d = d.clamp_min(0)
        safe = torch.where(d == 0, torch.ones_like(d), d)[..., None]
        q = torch.round(base / safe).clamp(low, high)
        rebuilt = d[..., None] * q if offset is None else d[..., None] * q + offset[..., None]  # as gguf de-quantises
        good = (rebuilt == values).all(-1) & ~found
        d_out[good] = d[good]
        q_out[good] = q[good].to(torch.int16)
        found |= good
    return (d_out, q_out) if bool(found.all()) else None


def derive(weight: torch.Tensor) -> Blocks | None:
    """`weight` (out x in, float32) as Q4_1 or Q8_0 blocks rebuilding it bit for bit; None if it is neither."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % BLOCK:
        return None
    rows, cols = weight.shape
    values = weight.detach().reshape(rows, cols // BLOCK, BLOCK)
    low, high = values.min(-1).values, values.max(-1).values
    q4 = _solve(values, _fp16_candidates((high - low) / 15), low, 0, 15)
    if q4 is not None:
        d, q = q4
        q = q.to(torch.uint8)
        packed = (q[..., :16] | (q[..., 16:] << 4)).reshape(rows, cols // 2)
        return Blocks("q4_1", packed.contiguous(), d.contiguous(), low.contiguous())
    amax = values.abs().max(-1).values
    q8 = _solve(values, _fp16_candidates(amax / 127), None, -128, 127)
    if q8 is not None:
        d, q = q8
        return Blocks("q8_0", q.to(torch.int8).reshape(rows, cols).contiguous(), d.contiguous(), None)
    return None


def concat(parts: list[Blocks]) -> Blocks | None:
    """Weights of the same kind stacked by output rows (q/k/v, gate/up); None when kinds differ."""
    if len({p.kind for p in parts}) != 1:
        return None
    m = None if parts[0].m is None else torch.cat([p.m for p in parts])  # type: ignore[misc]
    return Blocks(parts[0].kind, torch.cat([p.q for p in parts]), torch.cat([p.d for p in parts]), m)


def matmul(lib: ctypes.CDLL, x: torch.Tensor, blocks: Blocks) -> torch.Tensor:
    """x (rows, in) float32 @ the blocks' weight^T: (rows, out) float32."""
    x = x.contiguous()
    out_features, in_features = blocks.shape
    y = torch.empty(x.shape[0], out_features)
    if blocks.kind == "q4_1":
        lib.q4_1_gemm(x.data_ptr(), x.shape[0], in_features, blocks.q.data_ptr(), blocks.d.data_ptr(),
                      blocks.m.data_ptr(), out_features, y.data_ptr())  # type: ignore[union-attr]
    else:
        lib.q8_0_gemm(x.data_ptr(), x.shape[0], in_features, blocks.q.data_ptr(), blocks.d.data_ptr(),
                      out_features, y.data_ptr())
    return y
