"""The block GEMMs of two versions of kernels.cpp side by side: the working tree's and the one at a git
revision, both built here (for this CPU's instruction set, `kernels.isa()`) and loaded into one process, timed
interleaved over all 211 linear layers of the packaged model (and its Q8_0 head alone); medians, milliseconds,
and each one's rate over all layers as a share of this CPU's fp32 FMA roof (measured first, with the working
tree's widest FMAs). Also checks that both give the same bits (or, where one sums in 16 lanes and the other in
8, outputs within rounding of each other).

With `--backlog`: the default workload's 24 prompts through the engine at `--batch` rows (continuous batching,
as `dare bench --batch`), each mode under each version in turn (its block GEMMs and attention), each with the
cost curve measured under it; tokens/s per round, medians, and whether both emit the same tokens.

    .venv/bin/python bench/kernels_ab.py --old HEAD~1 > bench/results/kernels_ab_row_chunks.txt
    .venv/bin/python bench/kernels_ab.py --old HEAD~1 --backlog --batch 4 --rounds 3
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
    subprocess.run([cxx, *kernels.flags(), str(directory / f"{name}.cpp"), "-o", str(directory / f"{name}.so")], check=True)
    return kernels._load(directory / f"{name}.so")


def source_at(revision: str) -> str:
    """kernels.cpp as it is at a git revision."""
    return subprocess.run(["git", "show", f"{revision}:workers/engine/runtime/kernels.cpp"], check=True, capture_output=True,
                          text=True, cwd=kernels.SOURCE.parent).stdout


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
    real_attention, real_matmul = kernels.attention, blocks.matmul

    def use(lib: object) -> None:  # every kernel the engine calls through these two, from `lib`
        kernels.attention = lambda _lib, *args: real_attention(lib, *args)  # type: ignore[misc]
        blocks.matmul = lambda _lib, *args: real_matmul(lib, *args)  # type: ignore[misc]

    pool, prompts = read_pool(POOL_PATH), default_prompts(SPEC_PATH)
    inputs = [chat_input_ids(lm.tokenizer, p.prompt) for p in prompts]
    segments = [p.segment for p in prompts]
    engines = {}
    for name, lib in libs.items():  # each kernel's engine schedules by the cost curve measured under it
        use(lib)
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
                use(lib)
                result = run_dare(engines[name], segments, inputs, pools, global_pool, mode, batch, settings.max_new_tokens)
                rates.setdefault((mode, name), []).append(result["tokens_per_s"])
                texts[(mode, name)] = result["outputs"]
                print(f"round {r + 1} {mode} {name}: {result['tokens_per_s']:.1f} tokens/s", flush=True)
    kernels.attention, blocks.matmul = real_attention, real_matmul
    names = list(libs)
    print(f"\n| mode | {' | '.join(f'{n} tokens/s' for n in names)} | {names[-1]} / {names[0]} | same tokens |")
    print(f"| --- | {' | '.join('---:' for _ in names)} | ---: | --- |")
    for mode in modes:
        medians = [statistics.median(rates[(mode, n)]) for n in names]
        same = all(texts[(mode, n)] == texts[(mode, names[0])] for n in names)
        print(f"| {mode} | {' | '.join(f'{m:.1f}' for m in medians)} | {medians[-1] / medians[0]:.3f} | {same} |")


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="HEAD", help="git revision of the other kernels.cpp")
    parser.add_argument("--rows", default="1,8,32,128,512")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backlog", action="store_true", help="instead: the 24-prompt backlog through the engine")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--modes", default="ar,relaxed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    old = source_at(args.old)
    with tempfile.TemporaryDirectory() as tmp:
        libs = {args.old: build(old, Path(tmp), "old"), "working tree": build(kernels.SOURCE.read_text(), Path(tmp), "new")}
        if args.backlog:
            backlog(libs, args.batch, args.rounds, args.modes.split(","))
            return
        lm, weights, found = packaged_blocks(args.threads)
        head = next(f for f in found if f.kind == "q8_0")
        roof = kernels.fma_roof(libs["working tree"])  # type: ignore[arg-type]
        flops_per_row = 2 * sum(w.numel() for w in weights)
        print(f"# {lm.model_id}: block GEMMs of kernels.cpp at {args.old} vs the working tree, {args.threads} threads, "
              f"medians of {args.rounds} interleaved rounds, ms; fp32 FMA roof {roof / 1e9:.0f} GFLOP/s\n")
        print(f"| rows | all layers, {args.old} | all layers, working tree | ratio | share of the roof, {args.old} / working tree "
              f"| head, {args.old} | head, working tree | ratio | head's outputs |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
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
            x, y = outputs.values()
            if torch.equal(x, y):
                same = "same bits"
            else:  # another order of sums (AVX-512 against AVX2): rounding apart, no more
                gap = ((x - y).abs().max() / x.abs().max()).item()
                assert gap < 1e-5, f"{rows} rows: the two versions differ by {gap:.1e} of the largest output"
                same = f"differ by ≤ {gap:.0e} of the largest"
            share = " / ".join(f"{flops_per_row * rows / (ms / 1000) / roof:.2f}" for ms in (a, b))
            print(f"| {rows} | {a:.2f} | {b:.2f} | {a / b:.2f}x | {share} | {c:.2f} | {d:.2f} | {c / d:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
