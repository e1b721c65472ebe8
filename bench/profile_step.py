"""torch.profiler of one decoding step (verify of `--width` tokens after a 300-token context), eager
and compiled, on the packaged model: where a step's time goes.

    .venv/bin/python bench/profile_step.py --width 8 --threads 2 > bench/results/profile_step.txt
    .venv/bin/python bench/profile_step.py --width 1,8 --weights blocks --eager-only > bench/results/profile_step_blocks.txt

The engine's own C++ kernels (kernels.py, called through ctypes) are invisible to torch's profiler; each
entry point is wrapped in a `record_function` labelled `cpp::<name>` here so that the table shows them.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from infra.settings import default_cache_dir
from workers.engine.runtime import blocks, kernels
from workers.engine.runtime.cache import SlotCache
from workers.engine.runtime.forward import Forward, causal_mask
from workers.engine.runtime.model import load_model
from workers.engine.runtime.steps import StepForward

CONTEXT = 300


def labelled(name: str, function: Callable[..., object]) -> Callable[..., object]:
    @functools.wraps(function)
    def run(*args: object, **kwargs: object) -> object:
        with record_function(f"cpp::{name}"):
            return function(*args, **kwargs)
    return run


def label_cpp_kernels() -> None:
    """The C++ entry points as the lean forward reaches them (module attributes, looked up per call)."""
    blocks.matmul = labelled("block_gemm", blocks.matmul)  # type: ignore[assignment]
    for name in ("rms_norm", "add_rms_norm", "rope_", "silu_mul", "attention"):
        setattr(kernels, name, labelled(name, getattr(kernels, name)))


def cached_context(forward: Forward, room: int, generator: torch.Generator) -> SlotCache:
    """A one-row slot cache holding a random `CONTEXT`-token prompt (prefilled by `forward`), with `room` more columns."""
    model = forward.model
    cache = SlotCache(model)
    cache.reserve(1, CONTEXT + room)
    cache.prepare(0, torch.arange(CONTEXT)[None], CONTEXT)
    prompt = torch.randint(0, model.config.vocab_size, (1, CONTEXT), generator=generator)
    forward(cache, prompt, torch.arange(CONTEXT)[None], causal_mask(CONTEXT, 0, next(model.parameters()).dtype))
    return cache


@torch.inference_mode()
def profile_steps(steps: StepForward, width: int, rows: int) -> None:
    model = steps.model
    vocab, dtype = model.config.vocab_size, next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(0)
    cache = cached_context(steps.forward, 80, generator)
    padded = steps.width(width)
    span = steps.span(cache, CONTEXT + padded)
    ids = torch.randint(0, vocab, (1, padded), generator=generator)
    positions = torch.arange(CONTEXT, CONTEXT + padded)[None]
    mask = causal_mask(padded, CONTEXT, dtype, span)

    def step() -> None:
        cache.prepare(0, positions, span)
        steps(cache, ids, positions, mask)

    start = time.perf_counter()
    step()  # compiles, if compiled
    first = time.perf_counter() - start
    times = []
    for _ in range(10):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    label = "compiled" if steps.compiled else "eager"
    print(f"## {label}: one step of {padded} tokens (asked {width}), median {1000 * statistics.median(times):.1f} ms "
          f"over 10 (first call {first:.1f} s)\n")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", default="8", help="tokens per step; several: comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--weights", default="full", choices=["full", "fp16", "blocks"], help="linear weights (weights.py)")
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled step (minutes to compile)")
    parser.add_argument("--rows", type=int, default=12, help="profiler table rows")
    args = parser.parse_args()
    label_cpp_kernels()
    lm = load_model(None, "cpu", args.dtype, default_cache_dir(), args.threads, weights=args.weights)
    print(f"# {lm.model_id}, {lm.describe()}, CPU {torch.backends.cpu.get_cpu_capability()}\n")
    for width in (int(w) for w in args.width.split(",")):
        profile_steps(lm.steps, width, args.rows)
        if not args.eager_only:
            profile_steps(StepForward(lm.steps.forward, compiled=True), width, args.rows)


if __name__ == "__main__":
    main()
