"""`dare bench --batch B[,B...]`: batched `hf-generate` (stock transformers `generate`, left padding,
a sweep of batch sizes up to the backlog) against batched `dare-strict` and `dare-relaxed` (the
engine's BatchDecoder at each batch size B, rows joining as others finish), all over the same
prompts, in one run. `dare-ar` is the same engine with no drafts: it separates what the engine
gains (no padding, its cache and attention) from what speculation gains.

Every figure is the backlog's tokens over its wall time, prefill included: the throughput an
offline knowledge job sees. `hf-generate` at batch 1 is also the reference for exactness: each
output is compared with it.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import get_args

from dare.benchmarks.reference import hf_generate_batch
from dare.benchmarks.workload import BenchPrompt
from schemas import Mode
from workers.engine import LoadedModel, TransformersEngine, chat_input_ids, load_or_measure

HF_SIZES = (1, 2, 4, 8, 16, 32)
REFERENCE = "hf-generate"
MODES: tuple[Mode, ...] = get_args(Mode)


def run_hf(lm: LoadedModel, inputs: list[list[int]], batch: int, max_new: int) -> dict:
    start, outputs = time.perf_counter(), []
    for i in range(0, len(inputs), batch):
        outputs += [g.token_ids for g in hf_generate_batch(lm, inputs[i : i + batch], max_new)]
    wall = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    return {"method": REFERENCE, "batch": batch, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "mean_accepted": 1.0, "outputs": outputs}


def run_dare(dare: TransformersEngine, segments: list[str], inputs: list[list[int]], pools: dict, global_pool,  # type: ignore[no-untyped-def]
             mode: str, batch: int, max_new: int) -> dict:
    """The backlog through one decoder of `batch` rows, each row refilled from the queue as soon as
    it finishes (continuous batching); prompt i drafts from its segment's pool and the global pool."""
    decoder = dare.decoder(rows=batch)
    waiting = deque(range(len(inputs)))
    results = {}
    start = time.perf_counter()
    while waiting or len(decoder):
        while waiting and len(decoder) < batch:  # continuous batching: the batch stays full
            i = waiting.popleft()
            sources = [(pools[segments[i]], 1.0), (global_pool, 1.0)]
            decoder.add(i, inputs[i], max_new, mode, sources)
        for finished in decoder.step():
            results[finished.key] = finished
    wall = time.perf_counter() - start
    outputs = [results[i].token_ids for i in range(len(inputs))]
    tokens = sum(len(o) for o in outputs)
    steps = sum(r.stats.steps for r in results.values())
    return {"method": f"dare-{mode}", "batch": batch, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "mean_accepted": sum(sum(r.stats.accepted) for r in results.values()) / steps if steps else 0.0,
            "outputs": outputs}


def run_batch_bench(lm: LoadedModel, prompts: list[BenchPrompt], pool_texts: dict[str, list[str]], sizes: tuple[int, ...],
                    max_new: int, cache_dir, hf_sizes: tuple[int, ...] = HF_SIZES, repeat: int = 1) -> dict:  # type: ignore[no-untyped-def]
    """Every configuration `repeat` times, in rounds (the machine's noise spreads over all of them);
    a configuration's figure is its median. `hf-generate` at batch 1, the exactness reference, runs once."""
    dare = TransformersEngine(lm, load_or_measure(lm, cache_dir))
    pools = {segment: dare.pool(texts) for segment, texts in pool_texts.items()}
    global_pool = dare.pool(list(dict.fromkeys(t for texts in pool_texts.values() for t in texts)))
    inputs = [chat_input_ids(lm.tokenizer, p.prompt) for p in prompts]
    hf_generate_batch(lm, inputs[:1], 2)  # warm-up
    samples: dict[tuple[str, int], list[dict]] = {}
    for round_ in range(repeat):
        for size in sorted({1, *(min(s, len(inputs)) for s in hf_sizes)}):  # a size past the backlog is the whole backlog
            if size > 1 or round_ == 0:
                samples.setdefault((REFERENCE, size), []).append(run_hf(lm, inputs, size, max_new))
                print(f"  {REFERENCE} batch {size}: {samples[REFERENCE, size][-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
        for mode in MODES:
            for size in sizes:
                samples.setdefault((f"dare-{mode}", size), []).append(run_dare(dare, [p.segment for p in prompts], inputs, pools, global_pool, mode, size, max_new))
                print(f"  dare-{mode} batch {size}: {samples[f'dare-{mode}', size][-1]['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
    runs = []
    for tries in samples.values():
        median = sorted(tries, key=lambda r: r["tokens_per_s"])[(len(tries) - 1) // 2]
        runs.append(median | {"samples": [round(r["tokens_per_s"], 2) for r in tries]})
    reference = runs[0]["outputs"]  # hf-generate at batch 1: plain greedy
    best = {}
    for r in runs:
        if r["tokens_per_s"] > best.get(r["method"], {"tokens_per_s": 0.0})["tokens_per_s"]:
            best[r["method"]] = r
    for r in runs:
        r["vs_best_hf"] = r["tokens_per_s"] / best[REFERENCE]["tokens_per_s"]
        r["equal_to_greedy"] = sum(a == b for a, b in zip(r["outputs"], reference))
    return {"model": lm.model_id, "device": lm.describe(), "weights": lm.weights,
            "prompts": len(prompts), "max_new_tokens": max_new, "sizes": list(sizes), "repeat": repeat,
            "best": {method: {"batch": r["batch"], "tokens_per_s": r["tokens_per_s"], "vs_best_hf": r["vs_best_hf"]}
                     for method, r in best.items()},
            "runs": runs}


def format_batch_table(report: dict) -> str:
    lines = [(f"model {report['model']} on {report['device']}, {report['prompts']} prompts, {report['max_new_tokens']} new "
              f"tokens; tokens/s over the whole backlog, prefill included; median of {report['repeat']} run(s)"),
             f"| method | batch | tokens/s | vs best {REFERENCE} | mean accepted | outputs equal to greedy | wall s | every run, tokens/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in report["runs"]:
        lines.append(f"| {r['method']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['vs_best_hf']:.2f}x | {r['mean_accepted']:.2f} "
                     f"| {r['equal_to_greedy']}/{report['prompts']} | {r['wall_s']:.1f} | {', '.join(f'{x:.1f}' for x in r['samples'])} |")
    lines.append("best of each: " + ", ".join(f"{m} {b['tokens_per_s']:.1f} tokens/s at batch {b['batch']} ({b['vs_best_hf']:.2f}x)"
                                              for m, b in report["best"].items()))
    return "\n".join(lines)
