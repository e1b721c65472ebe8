"""The block GEMMs of two versions of kernels.cpp side by side: the working tree's and the one at a git
revision, both built here and loaded into one process, timed interleaved over all 211 linear layers of
the packaged model (and its Q8_0 head alone); medians, milliseconds, and each one's rate over all layers
as a share of this CPU's fp32 FMA roof (measured first). Also checks that both give the same bits.

    .venv/bin/python bench/kernels_ab.py --old HEAD~1 > bench/results/kernels_ab_row_chunks.txt
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from linear_kernels import packaged_blocks  # bench/ is on the path of a script run from it

from workers.engine.runtime import blocks, kernels


def build(source: str, directory: Path, name: str) -> object:
    (directory / f"{name}.cpp").write_text(source)
    cxx = kernels.compiler()
    assert cxx is not None, kernels.unavailable()
    subprocess.run([cxx, *kernels.FLAGS, str(directory / f"{name}.cpp"), "-o", str(directory / f"{name}.so")], check=True)
    return kernels._load(directory / f"{name}.so")


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="HEAD", help="git revision of the other kernels.cpp")
    parser.add_argument("--rows", default="1,8,32,128,512")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old = subprocess.run(["git", "show", f"{args.old}:workers/engine/runtime/kernels.cpp"], check=True, capture_output=True,
                         text=True, cwd=kernels.SOURCE.parent).stdout
    with tempfile.TemporaryDirectory() as tmp:
        libs = {args.old: build(old, Path(tmp), "old"), "working tree": build(kernels.SOURCE.read_text(), Path(tmp), "new")}
        lm, weights, found = packaged_blocks(args.threads)
        head = next(f for f in found if f.kind == "q8_0")
        roof = kernels.fma_roof(libs["working tree"])  # type: ignore[arg-type]
        flops_per_row = 2 * sum(w.numel() for w in weights)
        print(f"# {lm.model_id}: block GEMMs of kernels.cpp at {args.old} vs the working tree, {args.threads} threads, "
              f"medians of {args.rounds} interleaved rounds, ms; fp32 FMA roof {roof / 1e9:.0f} GFLOP/s\n")
        print(f"| rows | all layers, {args.old} | all layers, working tree | ratio | share of the roof, {args.old} / working tree "
              f"| head, {args.old} | head, working tree | ratio |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for rows in (int(r) for r in args.rows.split(",")):
            inputs = {n: torch.randn(rows, n) for n in {w.shape[1] for w in weights}}
            every: dict[str, list[float]] = {name: [] for name in libs}
            heads: dict[str, list[float]] = {name: [] for name in libs}
            outputs = {}
            for _ in range(args.rounds):
                for name, lib in libs.items():
                    start = time.perf_counter()
                    for f, w in zip(found, weights):
                        blocks.matmul(lib, inputs[w.shape[1]], f)  # type: ignore[arg-type]
                    every[name].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    outputs[name] = blocks.matmul(lib, inputs[head.shape[1]], head)  # type: ignore[arg-type]
                    heads[name].append(time.perf_counter() - start)
            a, b = (1000 * statistics.median(every[name]) for name in libs)
            c, d = (1000 * statistics.median(heads[name]) for name in libs)
            assert torch.equal(*outputs.values()), f"{rows} rows: the two versions give different bits"
            share = " / ".join(f"{flops_per_row * rows / (ms / 1000) / roof:.2f}" for ms in (a, b))
            print(f"| {rows} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {share} | {c:.2f} | {d:.2f} | {c / d:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
