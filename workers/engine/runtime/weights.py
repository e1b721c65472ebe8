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

The model itself is never changed: the engine's forward (lean.py) is built with a `Kernels` maker that
turns the model's linear layers into kernels of the chosen kind, held by the forward. The model's own
modules keep the weights as loaded, so transformers' `generate` (the `hf-generate` reference) runs stock.
"""

from __future__ import annotations

from collections.abc import Callable
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



class BlockKernel:
    """The weights as their own Q4_1/Q8_0 blocks (blocks.py): exact, fp32 sums."""

    def __init__(self, weight_blocks: blocks.Blocks, bias: torch.Tensor | None, lib: object) -> None:
        self.blocks, self.lib = weight_blocks, lib
        self.bias = None if bias is None else bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = blocks.matmul(self.lib, x, self.blocks)  # type: ignore[arg-type]
        return out if self.bias is None else out.add_(self.bias)



class FullKernel:
    """The weights as loaded (torch's own GEMM)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


Kernel = Fp16Kernel | BlockKernel | FullKernel
Kernels = Callable[[list[torch.nn.Linear]], Kernel]  # linear layers reading one input → one kernel, outputs side by side


def full_kernels(linears: list[torch.nn.Linear]) -> Kernel:
    """The layers as loaded (one layer: its own weight, not a copy)."""
    if len(linears) == 1:
        return FullKernel(linears[0].weight.detach(), None if linears[0].bias is None else linears[0].bias.detach())
    return FullKernel(stacked_weight(linears), stacked_bias(linears))


def fp16_kernels(linears: list[torch.nn.Linear]) -> Kernel:
    return Fp16Kernel(stacked_weight(linears), stacked_bias(linears))


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


class Projection:
    """Linear layers reading the same input (q/k/v, gate/up, or one layer) as one kernel from `kernels`:
    `joined(x)` gives their outputs side by side, calling it gives them one by one."""

    def __init__(self, linears: list[torch.nn.Linear], kernels: Kernels = full_kernels) -> None:
        self.sizes = [m.out_features for m in linears]
        self.kernel = kernels(linears)

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs side by side, (..., sum of sizes)."""
        return run_kernel(self.kernel, x)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
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
    still fall back from blocks to fp16 at load: `linear_kernels`); ValueError when the kind asked for cannot run."""
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


def linear_kernels(model: torch.nn.Module, kind: Packed, cache_dir: Path | None = None) -> Kernels:
    """The maker of `kind` kernels for `model`'s linear layers. For blocks every layer's weights are
    derived up front: NotBlocksError when some layer's are not exact Q4_1/Q8_0 blocks; layers joined
    across kinds (a Q4_1 q beside a Q8_0 v) stay as loaded. `cache_dir` holds the built block kernels."""
    if kind == "fp16":
        return fp16_kernels
    if cache_dir is None:
        raise ValueError("block kernels need a cache directory to be built into")
    lib = kernels.library(cache_dir)
    derived: dict[torch.nn.Module, blocks.Blocks] = {}
    for name, child in model.named_modules():
        if isinstance(child, torch.nn.Linear):
            found = blocks.derive(child.weight)
            if found is None:
                raise NotBlocksError(f"{name}'s weights are not exact Q4_1/Q8_0 blocks")
            derived[child] = found

    def block_kernels(linears: list[torch.nn.Linear]) -> Kernel:
        joined = blocks.concat([derived[m] for m in linears])
        return full_kernels(linears) if joined is None else BlockKernel(joined, stacked_bias(linears), lib)

    return block_kernels
