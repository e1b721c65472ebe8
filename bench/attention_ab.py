"""The attention kernel of two versions of kernels.cpp side by side: the working tree's and the one at a git
revision, both built here and loaded into one process, interleaved.

1. The kernel alone at the shapes of the engine's steps (the packaged model's 9 query heads over 3 key/value
   heads of 64): medians, milliseconds and GFLOP/s, and whether both give the same bits.
2. With `--backlog`: the default workload's 24 prompts through the engine at `--batch` rows (continuous
   batching, as `dare bench --batch`), each mode under each kernel in turn, each kernel with the cost curve
   measured under it; tokens/s per round, medians, and whether both kernels emit the same tokens.

    .venv/bin/python bench/attention_ab.py --old HEAD~1 --backlog > bench/results/attention_ab.txt
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from kernels_ab import build  # bench/ is on the path of a script run from it

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


@torch.inference_mode()
def backlog(libs: dict[str, object], batch: int, rounds: int, modes: list[str]) -> None:
    from dare.benchmarks.batch import run_dare
    from dare.benchmarks.workload import POOL_PATH, SPEC_PATH, default_prompts, read_pool
    from dare.cli import load_lm
    from infra.settings import load_settings
    from workers.engine.backends.transformers import TransformersEngine, measure_cost
    from workers.engine.runtime.model import chat_input_ids

    settings = load_settings()
    lm = load_lm(settings)
    real = kernels.attention
    pool, prompts = read_pool(POOL_PATH), default_prompts(SPEC_PATH)
    inputs = [chat_input_ids(lm.tokenizer, p.prompt) for p in prompts]
    segments = [p.segment for p in prompts]
    engines = {}
    for name, lib in libs.items():  # each kernel's engine schedules by the cost curve measured under it
        kernels.attention = lambda _lib, *args, lib=lib: real(lib, *args)  # type: ignore[misc]
        engines[name] = TransformersEngine(lm, measure_cost(lm.steps, lm.device))
        print(f"{name}: cost curve ms {engines[name].cost.milliseconds()}", flush=True)
    dare = next(iter(engines.values()))
    pools = {segment: dare.pool(texts) for segment, texts in pool.items()}
    global_pool = dare.pool(list(dict.fromkeys(t for texts in pool.values() for t in texts)))
    print(f"{lm.describe()}; {len(inputs)} prompts, batch {batch}, {settings.max_new_tokens} new tokens")
    rates: dict[tuple[str, str], list[float]] = {}
    texts: dict[tuple[str, str], list] = {}
    for r in range(rounds):
        for mode in modes:
            for name, lib in libs.items():
                kernels.attention = lambda _lib, *args, lib=lib: real(lib, *args)  # type: ignore[misc]
                result = run_dare(engines[name], segments, inputs, pools, global_pool, mode, batch, settings.max_new_tokens)
                rates.setdefault((mode, name), []).append(result["tokens_per_s"])
                texts[(mode, name)] = result["outputs"]
                print(f"round {r + 1} {mode} {name}: {result['tokens_per_s']:.1f} tokens/s", flush=True)
    kernels.attention = real
    names = list(libs)
    print(f"\n| mode | {' | '.join(f'{n} tokens/s' for n in names)} | {names[-1]} / {names[0]} | same tokens |")
    print(f"| --- | {' | '.join('---:' for _ in names)} | ---: | --- |")
    for mode in modes:
        medians = [statistics.median(rates[(mode, n)]) for n in names]
        same = all(texts[(mode, n)] == texts[(mode, names[0])] for n in names)
        print(f"| {mode} | {' | '.join(f'{m:.1f}' for m in medians)} | {medians[-1] / medians[0]:.3f} | {same} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="HEAD", help="git revision of the other kernels.cpp")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backlog", action="store_true", help="also the 24-prompt backlog through the engine")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--backlog-rounds", type=int, default=3)
    parser.add_argument("--modes", default="ar,relaxed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = Path(kernels.__file__).with_name("kernels.cpp")
    relative = source.relative_to(Path(__file__).resolve().parent.parent)
    old_source = subprocess.run(["git", "show", f"{args.old}:{relative}"], check=True, capture_output=True, text=True).stdout
    rev = subprocess.run(["git", "rev-parse", "--short", args.old], check=True, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        libs = {f"old ({rev})": build(old_source, Path(tmp), "old"), "new": build(source.read_text(), Path(tmp), "new")}
        print(f"attention kernel A/B, {time.strftime('%Y-%m-%d')}, {args.threads} threads, medians of {args.rounds}")
        shapes(libs, args.rounds)
        if args.backlog:
            backlog(libs, args.batch, args.backlog_rounds, args.modes.split(","))


if __name__ == "__main__":
    main()
