"""`dare bench`: every method on the same prompts, in one run, side by side.

Methods: `hf-generate` (stock transformers greedy `generate`: what users would run instead, and the
reference of every speedup), `pld` (transformers prompt lookup), `rest` (one global pool over all
pool texts, strict, longest match dominates, no prompt lookup), `dare-ar` (this engine's own greedy
decoding: no drafts), `dare-strict`, `dare-relaxed`. Plain DARE drafts from the prompt's segment pool merged with the
global pool (and the request's own text); pool variants by suffix draft from one pool only:
`@segment`, `@global` (all pool texts), `@random` (a random sample as large as the segment pool).
Prompts run one after another and, within a prompt, every method in turn, so machine noise
hits all methods alike.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dare.benchmarks.reference import hf_generate
from dare.benchmarks.workload import BenchPrompt, WorkloadError
from workers.engine import DraftConfig, LoadedModel, Pool, Strategy, TransformersEngine, chat_input_ids, load_or_measure

BASE_METHODS = ("hf-generate", "pld", "rest", "dare-ar", "dare-strict", "dare-relaxed")
REFERENCE = "hf-generate"
POOL_VARIANTS = ("segment", "global", "random")
PLD_TOKENS = 10


@dataclass
class MethodTotals:
    tokens: int = 0
    steps: int = 0
    wall_s: float = 0.0
    retrieval_s: float = 0.0
    forward_s: float = 0.0
    per_prompt_tps: list[float] = field(default_factory=list)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for method in methods:
        base, _, variant = method.partition("@")
        if base not in BASE_METHODS:
            renamed = " (`ar` was renamed: hf-generate is transformers generate, dare-ar the engine's greedy)" if base == "ar" else ""
            raise WorkloadError(f"unknown method {method!r}: choose from {', '.join(BASE_METHODS)}{renamed}")
        if variant and (base not in ("dare-strict", "dare-relaxed") or variant not in POOL_VARIANTS):
            raise WorkloadError(f"unknown pool variant in {method!r}: dare-strict@ or dare-relaxed@{{{','.join(POOL_VARIANTS)}}}")
    if REFERENCE not in methods:
        methods.insert(0, REFERENCE)  # every speedup is measured against it
    return methods


class ForwardCounter:
    """Counts the model's forward calls (steps of transformers' own generate loops)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


def run_hf(lm: LoadedModel, input_ids: list[int], max_new_tokens: int, counter: ForwardCounter, pld: bool) -> dict:
    calls = counter.calls
    gen = hf_generate(lm, input_ids, max_new_tokens, **({"prompt_lookup_num_tokens": PLD_TOKENS} if pld else {}))
    steps = max(1, counter.calls - calls)  # the prefill yields the first token, like DARE's first step
    return {"token_ids": gen.token_ids, "steps": steps, "wall_s": gen.wall_s, "retrieval_s": 0.0, "forward_s": gen.wall_s}


def run_bench(lm: LoadedModel, prompts: list[BenchPrompt], pool_texts: dict[str, list[str]], methods: list[str],
              max_new_tokens: int, cache_dir: Path | None, draft: DraftConfig | None = None, seed: int = 0) -> dict:
    tokenizer = lm.tokenizer
    cost = load_or_measure(lm, cache_dir)
    dare = TransformersEngine(lm, cost, Strategy(draft or DraftConfig()))
    segment_pools = {segment: dare.pool(texts) for segment, texts in pool_texts.items()}
    all_texts = list(dict.fromkeys(t for texts in pool_texts.values() for t in texts))  # pools may share texts
    global_pool = dare.pool(all_texts)
    rng = random.Random(seed)
    random_pools = {s: dare.pool(rng.sample(all_texts, len(texts))) for s, texts in pool_texts.items()}
    rest = TransformersEngine(lm, cost, Strategy(DraftConfig(**{**vars(dare.strategy.draft), "length_power": 4.0})))
    counter = ForwardCounter(lm.model)

    def pools_for(method: str, segment: str) -> list[tuple[Pool, float]]:
        variant = method.partition("@")[2]
        if not variant:
            return [(segment_pools[segment], 1.0), (global_pool, 1.0)]
        return [({"segment": segment_pools, "random": random_pools}[variant][segment] if variant != "global" else global_pool, 1.0)]

    # Warm-up: one short run of each engine path, outside the measurements.
    warm = chat_input_ids(tokenizer, prompts[0].prompt)
    run_hf(lm, warm, 4, counter, pld=False)
    dare.generate(warm, pools_for("dare-strict", prompts[0].segment), "strict", 4)

    totals = {m: MethodTotals() for m in methods}
    results = []
    for n, prompt in enumerate(prompts, start=1):
        input_ids = chat_input_ids(tokenizer, prompt.prompt)
        outputs = {}
        for method in methods:
            base = method.partition("@")[0]
            if base in (REFERENCE, "pld"):
                r = run_hf(lm, input_ids, max_new_tokens, counter, pld=base == "pld")
            else:
                if base == "rest":
                    out = rest.generate(input_ids, [(global_pool, 1.0)], "strict", max_new_tokens, use_self=False)
                else:
                    out = dare.generate(input_ids, pools_for(method, prompt.segment), base.removeprefix("dare-"), max_new_tokens)
                s = out.stats
                r = {"token_ids": out.token_ids, "steps": s.steps, "wall_s": s.wall_s, "retrieval_s": s.retrieval_s,
                     "forward_s": s.forward_s + s.prefill_s}
            t = totals[method]
            t.tokens += len(r["token_ids"])
            t.steps += r["steps"]
            t.wall_s += r["wall_s"]
            t.retrieval_s += r["retrieval_s"]
            t.forward_s += r["forward_s"]
            t.per_prompt_tps.append(len(r["token_ids"]) / r["wall_s"] if r["wall_s"] else 0.0)
            outputs[method] = {"token_ids": r["token_ids"], "text": tokenizer.decode(r["token_ids"], skip_special_tokens=True),  # type: ignore[attr-defined]
                               "steps": r["steps"], "wall_s": round(r["wall_s"], 4)}
        ref_tps = totals[REFERENCE].per_prompt_tps[-1]
        line = "  ".join(f"{m} {totals[m].per_prompt_tps[-1] / ref_tps:.2f}x" for m in methods if m != REFERENCE)
        print(f"[{n}/{len(prompts)}] {prompt.id} ({prompt.segment}): {REFERENCE} {ref_tps:.1f} tok/s  {line}", file=sys.stderr, flush=True)
        results.append({"id": prompt.id, "segment": prompt.segment, "outputs": outputs})
    counter.handle.remove()

    ref = totals[REFERENCE]
    ref_tps = ref.tokens / ref.wall_s
    summary = {}
    for method, t in totals.items():
        tps = t.tokens / t.wall_s if t.wall_s else 0.0
        summary[method] = {
            "tokens_per_s": tps,
            "speedup": tps / ref_tps if ref_tps else 0.0,
            "median_speedup": statistics.median(a / b for a, b in zip(t.per_prompt_tps, ref.per_prompt_tps) if b),
            "mean_accepted": t.tokens / t.steps if t.steps else 0.0,
            "retrieval_ms_per_step": 1000 * t.retrieval_s / t.steps if t.steps else 0.0,
            "overhead_share": max(0.0, (t.wall_s - t.forward_s) / t.wall_s) if t.wall_s else 0.0,
            "wall_s": t.wall_s,
            "tokens": t.tokens,
            "steps": t.steps,
        }
    return {
        "model": lm.model_id,
        "device": lm.describe(),
        "weights": lm.weights,
        "steps": {"compiled": lm.steps.compiled, "graphs": lm.steps.compiles, "compile_s": round(lm.steps.compile_s, 1)},
        "max_new_tokens": max_new_tokens,
        "reference": REFERENCE,
        "cost_ms": {str(k): round(v * 1000, 2) for k, v in cost.seconds.items()},
        "pool_texts": {s: len(t) for s, t in pool_texts.items()},
        "methods": summary,
        "prompts": results,
    }


def format_table(report: dict) -> str:
    lines = [
        f"model {report['model']} on {report['device']}, {len(report['prompts'])} prompts, {report['max_new_tokens']} new tokens"
        + (f"; {report['steps']['graphs']} step graphs compiled in {report['steps']['compile_s']} s (not in the figures)"
           if report.get("steps", {}).get("compiled") else ""),
        f"| method | tokens/s | speedup vs {REFERENCE} | median per-prompt speedup | mean accepted | retrieval ms/step | overhead share | wall s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, m in report["methods"].items():
        lines.append(
            f"| {method} | {m['tokens_per_s']:.1f} | {m['speedup']:.2f}x | {m['median_speedup']:.2f}x | "
            f"{m['mean_accepted']:.2f} | {m['retrieval_ms_per_step']:.2f} | {100 * m['overhead_share']:.1f}% | {m['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def check_prompt_lengths(lm: LoadedModel, prompts: list[BenchPrompt], max_new_tokens: int, source: str) -> None:
    limit = int(getattr(lm.model.config, "max_position_embeddings", 1 << 30))
    for n, prompt in enumerate(prompts, start=1):
        length = len(chat_input_ids(lm.tokenizer, prompt.prompt))
        if length + max_new_tokens > limit:
            raise WorkloadError(f"{source}:{n}: prompt {prompt.id!r} has {length} tokens; with {max_new_tokens} new tokens "
                                f"it exceeds the model's context of {limit}")


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=1) + "\n")
