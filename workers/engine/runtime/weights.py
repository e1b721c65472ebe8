"""The linear layers' weights in decoding: as loaded, as the GGUF's own blocks, or fp16 (CPU).

On the CPU a decoding step is mostly its linear layers, and at the few rows a step has, MKL's fp32
kernels read the weights at well under the memory's bandwidth. Two lighter kernels:

- `blocks` (blocks.py): the weights as the Q4_1/Q8_0 blocks the packaged model ships in, multiplied by
  the engine's own AVX2 kernel. Every weight equals the loaded fp32 weight, sums are fp32, and a row's
  output does not depend on how many rows a call has. Only where the loaded weights are such blocks
  exactly (the packaged default is; a model from fp32/bf16 checkpoints is not).
- `fp16`: fbgemm's fp16 GEMM (`quantized::linear_dynamic_fp16`: weights rounded to fp16, prepacked;
  activations and accumulation fp32). Rounding weights to fp16 moves SmolLM2's logits by ~0.03.

`auto` takes blocks where the weights are blocks, else fp16, on a CPU with AVX2 at float32 (docs/engine.md
has the figures). Strict mode equals this engine's own greedy decoding at the
same weights.

No model code is patched: every `nn.Linear` child is swapped for a `PackedLinear` that keeps the
original, and `full_weights` switches back to it, so transformers' own `generate` (the
`hf-generate` reference) runs stock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch

from workers.engine.runtime import blocks, kernels

Weights = Literal["auto", "blocks", "fp16", "full"]
Packed = Literal["blocks", "fp16"]


class NotBlocksError(ValueError):
    pass


class Fp16Kernel:
    """fbgemm's fp16 GEMM: weights rounded to fp16 and prepacked, activations and sums fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight.detach(), None if bias is None else bias.detach())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

    def fuse(self, parts: list[Kernel], linears: list[torch.nn.Linear]) -> Kernel | None:
        return Fp16Kernel(stacked_weight(linears), stacked_bias(linears))


class BlockKernel:
    """The weights as their own Q4_1/Q8_0 blocks (blocks.py): exact, fp32 sums."""

    def __init__(self, weight_blocks: blocks.Blocks, bias: torch.Tensor | None, lib: object) -> None:
        self.blocks, self.lib = weight_blocks, lib
        self.bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = blocks.matmul(self.lib, x, self.blocks)  # type: ignore[arg-type]
        return out if self.bias is None else out.add_(self.bias)

    def fuse(self, parts: list[Kernel], linears: list[torch.nn.Linear]) -> Kernel | None:
        joined = blocks.concat([k.blocks for k in parts])  # type: ignore[union-attr]
        return None if joined is None else BlockKernel(joined, stacked_bias(linears), self.lib)


Kernel = Fp16Kernel | BlockKernel


def stacked_weight(linears: list[torch.nn.Linear]) -> torch.Tensor:
    """The layers' weights stacked by output rows."""
    return torch.cat([m.weight.detach() for m in linears])


def stacked_bias(linears: list[torch.nn.Linear]) -> torch.Tensor | None:
    """The layers' biases stacked by output rows (zeros where a layer has none); None if none has one."""
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias.detach() if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears])


def run_kernel(kernel: Kernel, x: torch.Tensor) -> torch.Tensor:
    """kernel over x (..., in): (..., out)."""
    out = kernel(x.reshape(-1, x.shape[-1]))
    return out.view(*x.shape[:-1], out.shape[-1])


class PackedLinear(torch.nn.Module):
    """An `nn.Linear` whose forward runs a lighter kernel; the original serves when `active` is off
    and for inputs that are not float32."""

    def __init__(self, linear: torch.nn.Linear, kernel: Kernel) -> None:
        super().__init__()
        self.linear, self.kernel = linear, kernel
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
        return run_kernel(self.kernel, x)


class FusedLinear(torch.nn.Module):
    """Several linear layers reading the same input as one GEMM (their outputs side by side), in the
    kind of the layers given: their kernel if they are `PackedLinear`s, else as loaded."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        super().__init__()
        linears = [m.linear if isinstance(m, PackedLinear) else m for m in layers]
        self.sizes = [m.out_features for m in linears]
        self.kernel: Kernel | None = None
        if all(isinstance(m, PackedLinear) for m in layers):
            parts: list[Kernel] = [m.kernel for m in layers]  # type: ignore[misc]
            self.kernel = parts[0].fuse(parts, linears)
        self.weight, self.bias = (None, None) if self.kernel is not None else (stacked_weight(linears), stacked_bias(linears))

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs side by side, (..., sum of sizes)."""
        if self.kernel is not None:
            return run_kernel(self.kernel, x)
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.joined(x).split(self.sizes, dim=-1)


def fp16_available() -> str | None:
    """None when packed fp16 weights run here, else why not."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "this torch build has no fbgemm (x86 CPUs with AVX2 only)"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"fbgemm needs AVX2; this CPU offers {torch.backends.cpu.get_cpu_capability()}"
    return None


def resolve_weights(setting: Weights, device: torch.device, dtype: torch.dtype) -> Packed | Literal["full"]:
    """What `setting` means for a model on `device` at `dtype`, before the weights are seen (auto may
    still fall back from blocks to fp16 at load: `pack_linears`); ValueError when the kind asked for cannot run."""
    if setting == "full":
        return "full"
    general = None
    if device.type != "cpu":
        general = f"a CPU kernel (device {device.type})"
    elif dtype != torch.float32:
        general = f"needs float32 activations (dtype {str(dtype).removeprefix('torch.')})"
    why_not = {kind: general or reason() for kind, reason in (("blocks", kernels.unavailable), ("fp16", fp16_available))}
    if setting != "auto":
        if why_not[setting] is not None:
            alternative = "fp16" if setting == "blocks" and why_not["fp16"] is None else "full"
            raise ValueError(f"--weights {setting}: {why_not[setting]}; use --weights {alternative}")
        return setting
    return "blocks" if why_not["blocks"] is None else "fp16" if why_not["fp16"] is None else "full"


def pack_linears(model: torch.nn.Module, kind: Packed = "fp16", cache_dir: Path | None = None) -> int:
    """Swap every `nn.Linear` in `model` for a `PackedLinear` of `kind`; returns how many. For blocks,
    NotBlocksError (nothing swapped) when some layer's weights are not exact Q4_1/Q8_0 blocks;
    `cache_dir` holds the built kernels."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, torch.nn.Linear)]
    chosen: list[Kernel] = []
    if kind == "blocks":
        if cache_dir is None:
            raise ValueError("block kernels need a cache directory to be built into")
        lib = kernels.library(cache_dir)
        names = {id(child): name for name, child in model.named_modules()}
        for _, _, child in targets:
            found = blocks.derive(child.weight)
            if found is None:
                raise NotBlocksError(f"{names[id(child)]}'s weights are not exact Q4_1/Q8_0 blocks")
            chosen.append(BlockKernel(found, child.bias, lib))
    else:
        chosen = [Fp16Kernel(child.weight, child.bias) for _, _, child in targets]
    for (parent, name, child), kernel in zip(targets, chosen):
        setattr(parent, name, PackedLinear(child, kernel))
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
