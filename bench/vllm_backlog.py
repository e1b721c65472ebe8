"""Where DARE's time goes over a backlog inside vLLM: one compiled DARE engine, the whole backlog at once
in each mode, interleaved (`ar`: no drafts, the same engine), plus a prefill-only pass (one new token).

    .venv-vllm/bin/python -P bench/vllm_backlog.py [--prompts 12] [--max-new-tokens 128] [--rounds 2]

Prints the probed step cost by tokens per step, then per pass: tokens/s, steps, ms per step, the
proposer's own time, draft tokens sent and accepted. Run alone on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from transformers import AutoTokenizer

from dare.benchmarks.vllm import pool_sources
from dare.benchmarks.workload import POOL_PATH, SPEC_PATH, default_prompts, read_pool
from infra.settings import Settings
from workers.engine.algorithm.draft import DraftConfig
from workers.engine.backends.transformers import PoolTexts
from workers.engine.backends.vllm import VllmEngine, load_or_probe, runtime_env
from workers.engine.runtime.model import cached_default_model, chat_input_ids


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    env = runtime_env()
    if env is not None:  # vLLM's CPU backend wants Intel OpenMP preloaded from process start
        os.execve(sys.executable, [sys.executable, "-P", *sys.argv], env)
    cache_dir = Settings().cache_dir
    model_dir = cached_default_model(cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = default_prompts(SPEC_PATH)[: args.prompts]
    pool_texts = read_pool(POOL_PATH)
    prompt_ids = [chat_input_ids(tokenizer, p.prompt) for p in prompts]
    sources = pool_sources(PoolTexts(tokenizer, DraftConfig()), pool_texts, [p.segment for p in prompts])
    engine = VllmEngine(str(model_dir), "dare", k=8, eager=False, prefix_caching=False)
    engine.set_cost(load_or_probe(engine, cache_dir))
    costs = ", ".join(f"{n}: {engine.cost.cost(n) * 1000:.0f}" for n in (1, 4, 8, 12, 16, 24, 32, 48, 64, 96, 144))
    print(f"{len(prompts)} prompts ({sum(map(len, prompt_ids))} prompt tokens), {args.max_new_tokens} new tokens, "
          f"vLLM float32 compiled, k=8\nprobed step cost, ms by tokens in the step: {costs}")
    engine.add(None, prompt_ids[0], 8)  # warm-up
    engine.run()
    proposer = engine.proposer
    print("| pass | tokens/s | wall s | steps | ms/step | proposer s | drafted | accepted |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for _ in range(args.rounds):
        for mode, new_tokens in (("ar", 1), ("ar", args.max_new_tokens), ("strict", args.max_new_tokens), ("relaxed", args.max_new_tokens)):
            before = proposer.retrieval_s
            for n, (ids, pools) in enumerate(zip(prompt_ids, sources)):
                engine.add(n, ids, new_tokens, mode, pools)
            start, steps, done = time.perf_counter(), 0, []
            while engine.engine.has_unfinished_requests():
                done.extend(engine.step())
                steps += 1
            wall = time.perf_counter() - start
            tokens = sum(len(d.token_ids) for d in done)
            drafted = sum(sum(d.stats.drafted) for d in done)
            accepted = sum(sum(d.stats.accepted) - d.stats.steps for d in done)
            name = "prefill only (ar, 1 token)" if new_tokens == 1 else mode
            print(f"| {name} | {tokens / wall:.1f} | {wall:.1f} | {steps} | {wall / steps * 1000:.0f} | "
                  f"{proposer.retrieval_s - before:.2f} | {drafted} | {accepted} |", flush=True)


if __name__ == "__main__":
    main()
