"""`dare bench --backend vllm`: DARE inside vLLM against vLLM's own decoding, same prompts and pools.

Methods: `vllm-greedy` (vLLM, no speculation: what users run instead), `vllm-ngram` (vLLM's prompt
lookup), `vllm-suffix` (vLLM's suffix decoding, when arctic-inference is installed), `dare-strict` and
`dare-relaxed` (DARE's proposer and acceptance inside vLLM), and `hf-dare-relaxed` (this project's
transformers engine, for reference). Each runs the prompts one at a time (batch 1), then all at once
(the whole backlog: vLLM's continuous batching; the transformers engine at batch 16). vLLM engines
run one after another in this process (each is started, measured and shut down), so the figures
are taken minutes apart: run on an idle machine, and repeat (`--repeat`) for medians.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dare.benchmarks.batch import run_dare
from dare.benchmarks.workload import BenchPrompt, WorkloadError
from workers.engine import DraftConfig, PoolTexts, Source, chat_input_ids

# name -> (vLLM engine method, request mode)
VLLM_METHODS = {
    "vllm-greedy": ("greedy", "ar"),
    "vllm-ngram": ("ngram", "ar"),
    "vllm-suffix": ("suffix", "ar"),
    "dare-strict": ("dare", "strict"),
    "dare-relaxed": ("dare", "relaxed"),
}
HF_METHOD = "hf-dare-relaxed"
HF_BACKLOG_BATCH = 16  # the transformers engine's best batch on this CPU (`dare bench --batch`)


@dataclass
class Figures:
    batch1_tps: list[float] = field(default_factory=list)  # one per repeat
    backlog_tps: list[float] = field(default_factory=list)
    tokens: int = 0
    steps: int = 0
    outputs: list[list[int]] = field(default_factory=list)  # batch-1 outputs of the last repeat

    def summary(self) -> dict:
        return {
            "batch1_tokens_per_s": statistics.median(self.batch1_tps) if self.batch1_tps else 0.0,
            "backlog_tokens_per_s": statistics.median(self.backlog_tps) if self.backlog_tps else 0.0,
            "mean_accepted": self.tokens / self.steps if self.steps else None,
        }


def available_methods(asked: str | None = None) -> list[str]:
    """The methods to run: `asked` (comma-separated) or all; vllm-suffix only with arctic-inference."""
    known = [*VLLM_METHODS, HF_METHOD]
    names = [m.strip() for m in asked.split(",") if m.strip()] if asked else known
    unknown = [m for m in names if m not in known]
    if unknown or not names:
        raise WorkloadError(f"unknown method(s) {', '.join(unknown) or '(none given)'} for --backend vllm; choose from {', '.join(known)}")
    if "vllm-suffix" in names and importlib.util.find_spec("arctic_inference") is None:
        names.remove("vllm-suffix")
        print("bench: vllm-suffix skipped: arctic-inference is not installed (`make install-vllm` builds it)", file=sys.stderr)
    return names


def global_texts(pool_texts: dict[str, list[str]]) -> list[str]:
    """Every pool text once: the global pool's texts."""
    return list(dict.fromkeys(t for ts in pool_texts.values() for t in ts))


def pool_sources(texts: PoolTexts, pool_texts: dict[str, list[str]], segments: list[str]) -> list[list[Source]]:
    """Each prompt's pools, as the worker gives them: its segment's and the global one, equally weighted."""
    segment_pools = {s: texts.pool(t) for s, t in pool_texts.items()}
    global_pool = texts.pool(global_texts(pool_texts))
    return [[(segment_pools[s], 1.0), (global_pool, 1.0)] for s in segments]


def run_vllm_methods(model_dir: Path, prompt_ids: list[list[int]], segments: list[str], pool_texts: dict[str, list[str]],
                     methods: list[str], max_new_tokens: int, repeat: int, eager: bool, k: int, cache_dir: Path | None
                     ) -> dict[str, Figures]:
    """Each vLLM engine in a process of its own, one after another (vLLM 0.32 fails to start a third engine
    in one process; and no engine inherits another's state)."""
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from workers.engine import runtime_env

    os.environ.update(runtime_env() or {})  # Intel OpenMP preloaded into the engines' processes (not this one)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    by_engine: dict[str, list[str]] = {}
    for name in methods:
        by_engine.setdefault(VLLM_METHODS[name][0], []).append(name)
    figures: dict[str, Figures] = {}
    for method, names in by_engine.items():
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            figures.update(pool.submit(engine_figures, model_dir, method, names, prompt_ids, segments, pool_texts,
                                       max_new_tokens, repeat, eager, k, cache_dir).result())
    return figures


def engine_figures(model_dir: Path, method: str, names: list[str], prompt_ids: list[list[int]], segments: list[str],
                   pool_texts: dict[str, list[str]], max_new_tokens: int, repeat: int, eager: bool, k: int,
                   cache_dir: Path | None) -> dict[str, Figures]:
    """One vLLM engine's methods: every prompt alone (batch 1), then all at once (the backlog)."""
    import os

    from transformers import AutoTokenizer

    from workers.engine import VllmEngine, load_or_probe

    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # vLLM logs to stdout: keep the parent's table alone there
    texts = PoolTexts(AutoTokenizer.from_pretrained(model_dir), DraftConfig())
    sources = pool_sources(texts, pool_texts, segments)
    start = time.perf_counter()
    # No prefix caching: every method meets every prompt for the first time, as a knowledge job does
    # (with it, whichever pass runs second would skip its prefills).
    engine = VllmEngine(str(model_dir), method, k=k, eager=eager, prefix_caching=False)
    print(f"bench: vLLM engine `{method}` started in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if method == "dare":
        print("bench: vLLM's step cost curve (probed once, ~25 s, then cached)", file=sys.stderr, flush=True)
        engine.set_cost(load_or_probe(engine, cache_dir))
    # vLLM's suffix drafter learns from every answer it sees: before each pass its cache holds the pool
    # texts (what DARE drafts from) and no answer of an earlier pass over the same prompts.
    seed = [texts.tokenizer.encode(t, add_special_tokens=False) for t in global_texts(pool_texts)] if method == "suffix" else None

    def fresh_pass() -> None:
        if seed is not None:
            engine.seed_suffix_cache(seed)

    engine.add(None, prompt_ids[0], 8)  # warm-up, outside the figures
    engine.run()
    figures = {m: Figures() for m in names}
    for r in range(repeat):
        for name in names:
            mode, f = VLLM_METHODS[name][1], figures[name]
            outputs, tokens, steps, wall = [], 0, 0, 0.0
            fresh_pass()
            for n, (ids, pools) in enumerate(zip(prompt_ids, sources)):
                t = time.perf_counter()
                engine.add(n, ids, max_new_tokens, mode, pools)
                [done] = engine.run()
                wall += time.perf_counter() - t
                outputs.append(done.token_ids)
                tokens += len(done.token_ids)
                steps += done.stats.steps
            f.batch1_tps.append(tokens / wall)
            f.outputs, f.tokens, f.steps = outputs, f.tokens + tokens, f.steps + steps
            fresh_pass()
            t = time.perf_counter()
            for n, (ids, pools) in enumerate(zip(prompt_ids, sources)):
                engine.add(n, ids, max_new_tokens, mode, pools)
            backlog = engine.run()
            f.backlog_tps.append(sum(len(d.token_ids) for d in backlog) / (time.perf_counter() - t))
            print(f"bench: [{r + 1}/{repeat}] {name}: batch 1 {f.batch1_tps[-1]:.1f} tok/s, "
                  f"backlog {f.backlog_tps[-1]:.1f} tok/s", file=sys.stderr, flush=True)
    return figures


def run_hf(lm, prompt_ids: list[list[int]], segments: list[str], pool_texts: dict[str, list[str]],  # type: ignore[no-untyped-def]
           max_new_tokens: int, repeat: int, cache_dir: Path | None) -> Figures:
    from workers.engine import TransformersEngine, load_or_measure

    dare = TransformersEngine(lm, load_or_measure(lm, cache_dir))
    segment_pools = {s: dare.pool(t) for s, t in pool_texts.items()}
    global_pool = dare.pool(global_texts(pool_texts))
    f = Figures()
    dare.generate(prompt_ids[0], [(global_pool, 1.0)], "relaxed", 4)  # warm-up
    for r in range(repeat):
        tokens, steps, wall, outputs = 0, 0, 0.0, []
        for ids, segment in zip(prompt_ids, segments):
            out = dare.generate(ids, [(segment_pools[segment], 1.0), (global_pool, 1.0)], "relaxed", max_new_tokens)
            outputs.append(out.token_ids)
            tokens, steps, wall = tokens + len(out.token_ids), steps + out.stats.steps, wall + out.stats.wall_s
        f.batch1_tps.append(tokens / wall)
        f.outputs, f.tokens, f.steps = outputs, f.tokens + tokens, f.steps + steps
        # At most HF_BACKLOG_BATCH rows at once, refilled as rows finish: as `dare bench --batch 16` runs it.
        # (Until 2026-12-02 this queued the whole backlog into one decoder, i.e. ran it at batch 24, and read
        # half of `dare bench --batch 16`'s figure.)
        backlog = run_dare(dare, segments, prompt_ids, segment_pools, global_pool, "relaxed", HF_BACKLOG_BATCH, max_new_tokens)
        f.backlog_tps.append(backlog["tokens_per_s"])
        print(f"bench: [{r + 1}/{repeat}] {HF_METHOD}: batch 1 {f.batch1_tps[-1]:.1f} tok/s, "
              f"backlog {f.backlog_tps[-1]:.1f} tok/s", file=sys.stderr, flush=True)
    return f


def run_vllm_bench(lm, model_dir: Path, prompts: list[BenchPrompt], pool_texts: dict[str, list[str]], methods: list[str],  # type: ignore[no-untyped-def]
                   max_new_tokens: int, cache_dir: Path | None, repeat: int = 1, eager: bool = False, k: int = 8) -> dict:
    """Every method's batch-1 and backlog tokens/s (medians over `repeat` runs) and acceptance. `lm`: the
    transformers model (its tokenizer; hf-dare-relaxed runs it here, vLLM engines run in child processes)."""
    import torch

    tokenizer = lm.tokenizer
    prompt_ids = [chat_input_ids(tokenizer, p.prompt) for p in prompts]
    segments = [p.segment for p in prompts]
    figures: dict[str, Figures] = {}
    hf_device = f"transformers, {lm.describe()}"
    if HF_METHOD in methods:
        figures[HF_METHOD] = run_hf(lm, prompt_ids, segments, pool_texts, max_new_tokens, repeat, cache_dir)
    vllm_methods = [m for m in methods if m in VLLM_METHODS]
    if vllm_methods:
        figures.update(run_vllm_methods(model_dir, prompt_ids, segments, pool_texts, vllm_methods, max_new_tokens, repeat,
                                        eager, k, cache_dir))
    reference = figures.get("vllm-greedy")
    summary = {}
    for name in methods:
        if name not in figures:
            continue
        s = figures[name].summary()
        if reference is not None and name != HF_METHOD:
            s["same_as_vllm_greedy"] = sum(a == b for a, b in zip(figures[name].outputs, reference.outputs)) / len(prompts)
        summary[name] = s
    return {
        "backend": "vllm",
        "model": lm.model_id,
        "device": f"cpu ({torch.backends.cpu.get_cpu_capability()}); vLLM float32 {'eager' if eager else 'compiled'}, k={k}"
                  + (f"; {HF_METHOD}: {hf_device}" if HF_METHOD in methods else ""),
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "repeat": repeat,
        "methods": summary,
    }


def format_vllm_table(report: dict) -> str:
    methods = report["methods"]
    greedy = methods.get("vllm-greedy", {})
    lines = [
        (f"model {report['model']} on {report['device']}; {report['prompts']} prompts, {report['max_new_tokens']} new tokens, "
         f"medians of {report['repeat']} run(s)"),
        "| method | batch 1 tokens/s | vs vllm-greedy | backlog tokens/s | vs vllm-greedy | mean accepted | same as vllm-greedy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in methods.items():
        b1 = f"{m['batch1_tokens_per_s'] / greedy['batch1_tokens_per_s']:.2f}x" if greedy else "—"
        bl = f"{m['backlog_tokens_per_s'] / greedy['backlog_tokens_per_s']:.2f}x" if greedy else "—"
        accepted = f"{m['mean_accepted']:.2f}" if m["mean_accepted"] is not None else "—"
        same = f"{100 * m['same_as_vllm_greedy']:.0f}%" if "same_as_vllm_greedy" in m else "—"
        lines.append(f"| {name} | {m['batch1_tokens_per_s']:.1f} | {b1} | {m['backlog_tokens_per_s']:.1f} | {bl} | "
                     f"{accepted} | {same} |")
    return "\n".join(lines)
