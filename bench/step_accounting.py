"""Where a backlog's decoding steps go, by kind of step: this engine over the default workload's 24 prompts at
one batch size (continuous batching, as `dare bench --batch`), `ar` and `relaxed` alternately. Per kind of step
(a full batch or its tail; retrieval or not; drafts sent or not): how many, rows and width, tokens emitted per
row, retrieval time, the forward's observed time against the cost curve's prediction for the tokens it computes
(rows x width where the forward pads, the real tokens where it packs),
and tokens per second within those steps. The rest of the wall time is prefill.

    .venv/bin/python bench/step_accounting.py --batch 16 --rounds 2 > bench/results/step_accounting.txt
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

from dare.benchmarks.batch import run_dare
from dare.benchmarks.workload import POOL_PATH, SPEC_PATH, default_prompts, read_pool
from dare.cli import load_lm
from infra.settings import load_settings
from workers.engine.backends import batch
from workers.engine.backends.transformers import TransformersEngine, load_or_measure
from workers.engine.runtime.model import chat_input_ids
from workers.engine.runtime.steps import StepForward

STEPS: list[dict] = []


def instrument() -> None:
    """Record every decoding step of every BatchDecoder (prefill excluded)."""
    step, draft, emit, forward = batch.BatchDecoder.step, batch.BatchDecoder._draft, batch.BatchDecoder._emit, StepForward.__call__
    current = {}

    def timed_draft(self):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        trees, drafting = draft(self)
        rows, width = len(self.rows), max(len(t) for t in trees) + 1
        self.record = current["record"] = {
            "rows": rows, "retrieval": drafting, "draft_s": time.perf_counter() - start, "width": width, "emitted": 0,
            "tokens": sum(len(t) + 1 for t in trees) if self.steps.packs else rows * width}  # tokens the forward computes
        return trees, drafting

    def timed_forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        logits = forward(self, *args, **kwargs)
        if "record" in current:
            current["record"]["forward_s"] = time.perf_counter() - start
        return logits

    def counted_emit(self, row, new, drafted):  # type: ignore[no-untyped-def]
        before = len(row.out)
        emit(self, row, new, drafted)
        self.record["emitted"] += len(row.out) - before

    def timed_step(self):  # type: ignore[no-untyped-def]
        if self.joining:
            self._admit()
        if self.filling:
            self._fill()
        if not self.rows:
            return []
        start = time.perf_counter()
        finished = step(self)
        STEPS.append(self.record | {"step_s": time.perf_counter() - start})
        return finished

    batch.BatchDecoder._draft, batch.BatchDecoder._emit, batch.BatchDecoder.step = timed_draft, counted_emit, timed_step
    StepForward.__call__ = timed_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="ar,relaxed", help="comma-separated, run alternately (ar, strict, relaxed)")
    parser.add_argument("--padded", action="store_true", help="verify drafts padded to the widest row even where the "
                        "forward packs (as before packing; an A/B aid)")
    args = parser.parse_args()
    if args.padded:
        StepForward.packs = property(lambda self: False)
    settings = load_settings()
    lm = load_lm(settings)
    cost = load_or_measure(lm, settings.cache_dir)
    pool, prompts = read_pool(POOL_PATH), default_prompts(SPEC_PATH)
    dare = TransformersEngine(lm, cost)
    pools = {segment: dare.pool(texts) for segment, texts in pool.items()}
    global_pool = dare.pool(list(dict.fromkeys(t for texts in pool.values() for t in texts)))
    inputs = [chat_input_ids(lm.tokenizer, p.prompt) for p in prompts]
    segments = [p.segment for p in prompts]
    instrument()
    run_dare(dare, segments, inputs[:2], pools, global_pool, "relaxed", 2, 8)  # warm-up
    print(f"{lm.describe()}; {len(inputs)} prompts, batch {args.batch}, {settings.max_new_tokens} new tokens; "
          f"cost curve ms {cost.milliseconds()}")
    full = 0.75 * args.batch
    for _ in range(args.rounds):
        for mode in args.modes.split(","):
            STEPS.clear()
            result = run_dare(dare, segments, inputs, pools, global_pool, mode, args.batch, settings.max_new_tokens)
            decoding = sum(s["step_s"] for s in STEPS)
            print(f"\n{mode}: {result['tokens_per_s']:.1f} tokens/s, wall {result['wall_s']:.1f} s, of which decoding steps "
                  f"{decoding:.1f} s ({len(STEPS)} steps), prefill and the rest {result['wall_s'] - decoding:.1f} s")
            print("| rows | retrieval | drafts sent | steps | mean rows | mean width | tokens computed | tokens/row | retrieval ms "
                  "| forward ms | forward+acceptance ms | curve ms | observed / curve | tokens/s in these steps |")
            print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            kinds = defaultdict(list)
            for s in STEPS:
                kinds[(s["rows"] >= full, s["retrieval"], s["width"] > 1)].append(s)
            for (wide, retrieval, sent), steps in sorted(kinds.items(), key=lambda kv: (not kv[0][0], kv[0][1], kv[0][2])):
                forward = [s["step_s"] - s["draft_s"] for s in steps]
                curve = [cost.cost(s["tokens"]) for s in steps]
                print(f"| {'>=' if wide else '<'} {full:.0f} | {retrieval} | {sent} | {len(steps)} "
                      f"| {statistics.mean(s['rows'] for s in steps):.1f} | {statistics.mean(s['width'] for s in steps):.2f} "
                      f"| {statistics.mean(s['tokens'] for s in steps):.1f} "
                      f"| {statistics.mean(s['emitted'] / s['rows'] for s in steps):.2f} "
                      f"| {1000 * statistics.mean(s['draft_s'] for s in steps):.1f} "
                      f"| {1000 * statistics.mean(s['forward_s'] for s in steps):.1f} | {1000 * statistics.mean(forward):.1f} "
                      f"| {1000 * statistics.mean(curve):.1f} | {statistics.mean(f / c for f, c in zip(forward, curve)):.2f} "
                      f"| {sum(s['emitted'] for s in steps) / sum(s['step_s'] for s in steps):.1f} |", flush=True)


if __name__ == "__main__":
    main()
