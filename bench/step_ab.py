"""One decoding step of the packaged model (`--width` tokens after a 300-token context) for each kind of
weights and each lean-forward glue: torch ops, the engine's C++ kernels with SDPA, and with its C++
attention too; interleaved so that the machine's drift falls on all alike; medians, milliseconds.
Also the largest logit difference of the all-C++ variant from the torch-glue one on the same weights.

    .venv/bin/python bench/step_ab.py > bench/results/step_ab.txt
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from profile_step import CONTEXT, cached_context  # bench/ is on the path of a script run from it

from infra.settings import default_cache_dir
from workers.engine.runtime import kernels
from workers.engine.runtime.forward import causal_mask
from workers.engine.runtime.lean import LeanForward
from workers.engine.runtime.model import load_model
from workers.engine.runtime.weights import linear_kernels


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", default="1,2,4,8,16,32", help="tokens per step, comma-separated")
    parser.add_argument("--weights", default="fp16,blocks", help="kinds of weights, comma-separated")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    widths = [int(w) for w in args.width.split(",")]
    models = {w: load_model(None, "cpu", "float32", default_cache_dir(), args.threads, weights=w) for w in args.weights.split(",")}
    variants = []  # (name, model, lean forward, C++ attention)
    lib = kernels.library(default_cache_dir())
    for kind, lm in models.items():
        assert lm.forward.startswith("lean+glue"), "the packaged model runs the lean forward with C++ glue"
        weights = linear_kernels(lm.model, kind, default_cache_dir())  # type: ignore[arg-type]
        variants += [(f"{kind}, torch glue", lm, LeanForward(lm.model, weights), False),
                     (f"{kind}, C++ glue, SDPA", lm, LeanForward(lm.model, weights, lib), False),
                     (f"{kind}, C++ glue + attention", lm, lm.steps.forward, True)]
    cpp_attention = kernels.attention
    caches = {kind: cached_context(lm.steps.forward, max(widths), torch.Generator().manual_seed(0)) for kind, lm in models.items()}
    times: dict[tuple[str, int], list[float]] = {}
    logits: dict[tuple[str, int], torch.Tensor] = {}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, lm, lean_forward, attention in variants:
            kernels.attention = cpp_attention if attention else lambda *_: None  # None: the lean forward uses SDPA
            cache = caches[lm.weights]
            for width in widths:
                positions = torch.arange(CONTEXT, CONTEXT + width)[None]
                cache.prepare(0, positions, CONTEXT + width)  # written over the same columns every time
                mask = causal_mask(width, CONTEXT, torch.float32, CONTEXT + width)
                ids = torch.arange(100, 100 + width)[None]
                start = time.perf_counter()
                out = lean_forward(cache, ids, positions, mask)
                times.setdefault((name, width), []).append(time.perf_counter() - start)
                logits.setdefault((name, width), out)
    print(f"# {next(iter(models.values())).model_id}, one step after {CONTEXT} tokens, {args.threads} threads, CPU "
          f"{torch.backends.cpu.get_cpu_capability()}; medians of {args.repeats} interleaved rounds, ms\n")
    print("| tokens | " + " | ".join(name for name, *_ in variants) + " | logits, all C++ vs torch glue: largest difference |")
    print("| ---: | " + " | ".join("---:" for _ in variants) + " | ---: |")
    for width in widths:
        medians = [1000 * statistics.median(times[(name, width)][1:]) for name, *_ in variants]
        difference = max((logits[(f"{kind}, C++ glue + attention", width)] - logits[(f"{kind}, torch glue", width)]).abs().max().item()
                         for kind in models)
        print(f"| {width} | " + " | ".join(f"{m:.1f}" for m in medians) + f" | {difference:.1e} |")


if __name__ == "__main__":
    main()
