"""The forward of decoding steps, eager or compiled.

`torch.compile` (inductor: C++ on CPU, Triton on CUDA) fuses a step's small ops and runs it as one
graph, which pays where per-op dispatch is a large share of a step (GPUs, fast CPUs). A compiled
graph is only as good as its reuse, so step shapes are kept to a few: the tokens per row are padded
up to a bucket (padding tokens see only themselves and are never read back) and attention reads a
fixed number of cache columns (the cache's capacity, whose unused columns the mask hides), so
steady-state steps hit graphs compiled earlier. Every compilation is counted and logged; a decode
that keeps compiling is a bug. On the 2-core CPU measured so far, matmuls are ~80 % of an eager step
and the compiled step was slower, so compiling is opt-in (docs/engine.md).

Prefill stays eager: prompts have every length, and a long forward is arithmetic-bound anyway.
"""

from __future__ import annotations

import time
from typing import Literal

import structlog
import torch

from workers.engine.runtime.cache import SlotCache
from workers.engine.runtime.forward import Forward, TransformersForward, engine_forward

log = structlog.get_logger("engine")

Compile = Literal["auto", "on", "off"]
BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # tokens per row; wider steps run at their own width


class StepForward:
    """Runs the decoding steps through `forward` (a model: its `engine_forward`), or, `compiled`, through
    torch.compile of transformers' forward on the weights as loaded. `forward` serves prefills either way."""

    def __init__(self, forward: Forward | torch.nn.Module, compiled: bool = False) -> None:
        self.forward = engine_forward(forward) if isinstance(forward, torch.nn.Module) else forward
        self.model = self.forward.model
        self.compiled = compiled
        self.compiles = 0  # graphs compiled so far
        self.compile_s = 0.0
        self._graph = TransformersForward(self.model, torch.compile(self.model, backend=self._backend, dynamic=False)) if compiled else None

    def width(self, tokens: int) -> int:
        """The width a step of `tokens` tokens per row runs at."""
        if not self.compiled:
            return tokens
        return next((b for b in BUCKETS if b >= tokens), tokens)

    def span(self, cache: SlotCache, needed: int) -> int:
        """Cache columns a step reads when it needs the first `needed`: compiled steps read them all (one shape)."""
        return cache.capacity if self.compiled else needed

    @property
    def packs(self) -> bool:
        """Whether a step's rows may verify different numbers of tokens without paying for the padding."""
        return self._graph is None and self.forward.packs

    def __call__(self, cache: object, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 counts: list[int] | None = None) -> torch.Tensor:
        """Logits of one step, (rows, tokens, vocab); `counts` where the forward `packs`: row b's real tokens are its
        first counts[b] (the rest padding), and the logits come packed, (sum(counts), vocab), row after row."""
        if self._graph is not None:
            try:
                return self._graph(cache, ids, positions, mask)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 (no C++ compiler, an unsupported op, ...: the eager path serves)
                log.warning("compiling the decoding steps failed; running them eager", error=repr(exc)[:300])
                self._graph, self.compiled = None, False
        if counts is not None and self.forward.packs:
            return self.forward(cache, ids, positions, mask, counts=counts)  # type: ignore[arg-type]
        return self.forward(cache, ids, positions, mask)  # type: ignore[arg-type]

    def _backend(self, graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):  # type: ignore[no-untyped-def]
        from torch._inductor.compile_fx import compile_fx

        start = time.perf_counter()
        compiled = compile_fx(graph, example_inputs)
        seconds = time.perf_counter() - start
        self.compiles += 1
        self.compile_s += seconds
        shapes = [tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() >= 2][:3]
        log.info("compiled a step graph", graphs=self.compiles, seconds=round(seconds, 1), inputs=shapes)
        return compiled


def resolve_compile(setting: Compile, device: torch.device) -> bool:
    """Whether steps are compiled. `auto` is off for now, on every device: on the 2-core CPU measured so
    far a graph took 2-5 minutes to build and the compiled step ran slower than eager; CUDA is untested."""
    return setting == "on"
