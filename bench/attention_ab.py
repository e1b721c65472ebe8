"""The attention kernel of two versions of kernels.cpp side by side: the working tree's and the one at a git
revision, both built here and loaded into one process, interleaved, at the shapes of the engine's steps (the
packaged model's 9 query heads over 3 key/value heads of 64): medians, milliseconds and GFLOP/s, and whether both
give the same bits. The whole engine on a backlog under each version: `bench/kernels_ab.py --backlog`.

    .venv/bin/python bench/attention_ab.py --old HEAD~1 > bench/results/attention_ab.txt
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from kernels_ab import build, source_at  # bench/ is on the path of a script run from it

from workers.engine.runtime import kernels

HEADS, KV_HEADS, DIM = 9, 3, 64
SHAPES = [  # name, rows, queries per row, keys per row (the queries sit at the last keys, causal)
    ("decode, 16 rows x 1 query, 500 keys", 16, 1, 500),
    ("verify, 16 rows x 3 queries, 500 keys", 16, 3, 500),
    ("verify, 1 row x 8 queries, 300 keys", 1, 8, 300),
    ("prefill chunk, 256 queries, 512 keys", 1, 256, 512),
]


def shapes(libs: dict[str, object], rounds: int) -> None:
    print("| shape | " + " | ".join(f"{name} ms | {name} GFLOP/s" for name in libs) + " | same bits |")
    print("| --- | " + " | ".join("---: | ---:" for _ in libs) + " | --- |")
    generator = torch.Generator().manual_seed(0)
    for label, rows, queries, keys in SHAPES:
        store = torch.randn(2, rows, KV_HEADS, keys + 64, DIM, generator=generator)  # a slot cache, read in place
        k, v = store[0, :, :, :keys], store[1, :, :, :keys]
        q = torch.randn(rows, HEADS, queries, DIM, generator=generator)
        mask = torch.zeros(1, 1, 1, keys)
        row_queries = torch.full((rows,), queries, dtype=torch.int64)
        row_keys = torch.full((rows,), keys, dtype=torch.int64)
        flops = sum(rows * HEADS * (keys - queries + t + 1) * DIM * 4 for t in range(queries))
        times: dict[str, list[float]] = {name: [] for name in libs}
        outs = {}
        for _ in range(rounds):
            for name, lib in libs.items():
                start, n = time.perf_counter(), 0
                while n == 0 or time.perf_counter() - start < 0.2:
                    outs[name] = kernels.attention(lib, q, k, v, mask, 0.125, row_queries, row_keys)  # type: ignore[arg-type]
                    n += 1
                times[name].append((time.perf_counter() - start) / n)
        first = next(iter(outs.values()))
        same = all(torch.equal(out, first) for out in outs.values())
        cells = " | ".join(f"{1e3 * statistics.median(t):.2f} | {flops / statistics.median(t) / 1e9:.0f}" for t in times.values())
        print(f"| {label} | {cells} | {same} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="HEAD", help="git revision of the other kernels.cpp")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rev = subprocess.run(["git", "rev-parse", "--short", args.old], check=True, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        libs = {f"old ({rev})": build(source_at(args.old), Path(tmp), "old"), "new": build(kernels.SOURCE.read_text(), Path(tmp), "new")}
        print(f"attention kernel A/B, {time.strftime('%Y-%m-%d')}, {args.threads} threads, medians of {args.rounds}")
        shapes(libs, args.rounds)


if __name__ == "__main__":
    main()
