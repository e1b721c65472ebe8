"""All linear layers of the packaged model, once, at a few rows: fp32 `F.linear` (MKL) vs the kernels
the engine can use on CPU (weights.py): fbgemm's packed fp16 and the GGUF's own Q4_1/Q8_0 blocks;
and the time to read the fp32 weights once (the memory-bandwidth floor of a one-token fp32 step).
Medians of 9 passes, milliseconds; each kernel's rate as a share of this CPU's fp32 FMA roof, measured
first (kernels.fma_roof: independent FMAs on every thread).

    .venv/bin/python bench/linear_kernels.py --threads 2 > bench/results/linear_kernels.txt
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from infra.settings import default_cache_dir
from workers.engine.runtime import blocks, kernels
from workers.engine.runtime.model import LoadedModel, load_model
from workers.engine.runtime.weights import BlockKernel, Fp16Kernel


def median_ms(run: Callable[[], object], passes: int = 9) -> float:
    run()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def packaged_blocks(threads: int) -> tuple[LoadedModel, list[torch.Tensor], list[blocks.Blocks]]:
    """The packaged model (weights as loaded), its linear layers' fp32 weights, and those as their blocks."""
    lm = load_model(None, "cpu", "float32", default_cache_dir(), threads, weights="full")
    weights = [m.weight for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    found = [blocks.derive(w) for w in weights]
    assert all(f is not None for f in found), "the packaged model's weights are Q4_1/Q8_0 blocks"
    return lm, weights, found  # type: ignore[return-value]


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", default="1,8,32,128,512")
    args = parser.parse_args()
    lm, weights, found = packaged_blocks(args.threads)
    lib = kernels.library(default_cache_dir())
    by_kind = {"fp16": [Fp16Kernel(w, None) for w in weights], "blocks": [BlockKernel(f, None, lib) for f in found]}
    megabytes = {"fp32": sum(w.numel() for w in weights) * 4 / 1e6, "fp16": sum(w.numel() for w in weights) * 2 / 1e6,
                 "blocks": sum(f.nbytes() for f in found) / 1e6}  # type: ignore[union-attr]
    print(f"# {lm.model_id}: {len(weights)} linear layers; weights read per pass: "
          + ", ".join(f"{kind} {mb:.0f} MB" for kind, mb in megabytes.items())
          + f"; {args.threads} threads, CPU {torch.backends.cpu.get_cpu_capability()}\n")
    print(f"read every fp32 weight once (sum): {median_ms(lambda: [w.sum() for w in weights]):.1f} ms")
    roof = kernels.fma_roof(lib)
    print(f"fp32 FMA roof: {roof / 1e9:.0f} GFLOP/s ({args.threads} threads)\n")
    flops_per_row = 2 * sum(w.numel() for w in weights)
    print("| rows | fp32 `F.linear` ms | packed fp16 ms | blocks ms | fp16 vs fp32 | blocks vs fp32 | blocks vs fp16 "
          "| share of the FMA roof: fp32 / fp16 / blocks |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {n: torch.randn(rows, n) for n in {w.shape[1] for w in weights}}
        full = median_ms(lambda x=inputs: [F.linear(x[w.shape[1]], w) for w in weights])
        fp16, block = (median_ms(lambda x=inputs, ks=by_kind[kind]: [k(x[w.shape[1]]) for k, w in zip(ks, weights)])
                       for kind in ("fp16", "blocks"))
        share = " / ".join(f"{flops_per_row * rows / (ms / 1000) / roof:.2f}" for ms in (full, fp16, block))
        print(f"| {rows} | {full:.1f} | {fp16:.1f} | {block:.1f} | {full / fp16:.2f}x | {full / block:.2f}x | {fp16 / block:.2f}x "
              f"| {share} |", flush=True)


if __name__ == "__main__":
    main()
