"""The linear layers' weights in decoding: as loaded, or fp16 in fbgemm's packed layout (CPU).

On the CPU a decoding step is mostly its linear layers (~80 % of an eager step), and at the few
rows a step has, MKL's fp32 kernels read the weights at well under the memory's bandwidth. fbgemm's
fp16 GEMM (`quantized::linear_dynamic_fp16`: weights stored as fp16, prepacked for its AVX2 kernel;
activations and accumulation stay fp32) halves the bytes and runs 2.2-3.5x faster at 1-16 rows
here (README, "The engine's forward"). Rounding weights to fp16 moves SmolLM2's logits by ~0.03;
its greedy output equalled fp32's on every bench prompt checked. Strict mode equals this engine's
own greedy decoding at the same weights, as it always did.

No model code is patched: every `nn.Linear` child is swapped for a `PackedLinear` that keeps the
original, and `full_weights` switches back to it, so transformers' own `generate` (the
`hf-generate` reference) runs stock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

Weights = Literal["auto", "fp16", "full"]


def fp16_linear(x: torch.Tensor, packed: object) -> torch.Tensor:
    """fbgemm's fp16 GEMM of x (..., in) with prepacked weights: (..., out)."""
    out = torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, x.shape[-1]), packed)
    return out.view(*x.shape[:-1], out.shape[-1])


class PackedLinear(torch.nn.Module):
    """An `nn.Linear` whose forward runs fbgemm's fp16 GEMM; the original serves when `active` is off."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        bias = None if linear.bias is None else linear.bias.detach()
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach(), bias)
        self.active = True

    @property
    def weight(self) -> torch.Tensor:  # transformers reads lm_head.weight (tying, resizing)
        return self.linear.weight

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or x.dtype != torch.float32:
            return self.linear(x)
        return fp16_linear(x, self.packed)


class FusedLinear(torch.nn.Module):
    """Several linear layers reading the same input as one GEMM (their outputs side by side), in the
    kind of the layers given: packed fp16 if they are `PackedLinear`s, else as loaded."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        super().__init__()
        linears = [m.linear if isinstance(m, PackedLinear) else m for m in layers]
        weight = torch.cat([m.weight.detach() for m in linears])
        biases = [m.bias for m in linears]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else weight.new_zeros(m.out_features) for b, m in zip(biases, linears)])
        self.sizes = [m.out_features for m in linears]
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight, bias) if isinstance(layers[0], PackedLinear) else None
        self.weight, self.bias = (None, None) if self.packed is not None else (weight, bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = fp16_linear(x, self.packed) if self.packed is not None else torch.nn.functional.linear(x, self.weight, self.bias)
        return out.split(self.sizes, dim=-1)


def fp16_available() -> str | None:
    """None when packed fp16 weights run here, else why not."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this torch build has no fbgemm (x86 CPUs with AVX2 only)"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"fbgemm needs AVX2; this CPU offers {torch.backends.cpu.get_cpu_capability()}"
    return None


def resolve_weights(setting: Weights, device: torch.device, dtype: torch.dtype) -> Literal["fp16", "full"]:
    """What `setting` means for a model on `device` at `dtype`; ValueError when `fp16` cannot run."""
    if setting == "full":
        return "full"
    why_not = fp16_available()
    if device.type != "cpu":
        why_not = f"packed fp16 weights are a CPU kernel (device {device.type})"
    elif dtype != torch.float32:
        why_not = f"packed fp16 weights need float32 activations (dtype {str(dtype).removeprefix('torch.')})"
    if why_not is None:
        return "fp16"
    if setting == "fp16":
        raise ValueError(f"--weights fp16: {why_not}; use --weights full")
    return "full"


def pack_linears(model: torch.nn.Module) -> int:
    """Swap every `nn.Linear` in `model` for a `PackedLinear`; returns how many."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, torch.nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)


@contextmanager
def full_weights(model: torch.nn.Module) -> Iterator[None]:
    """Run the forwards inside on the weights as loaded (a no-op for a model without packed layers)."""
    packed = [m for m in model.modules() if isinstance(m, PackedLinear) and m.active]
    for m in packed:
        m.active = False
    try:
        yield
    finally:
        for m in packed:
            m.active = True
