"""`dare bench` on pools built by the pool builder: segment pools against the global pool and a
random pool of equal size, with neighbourhoods on (default) and off (members only).

    .venv/bin/python -P bench/service_pools_bench.py [--limit 8] [--max-new-tokens 128] [--json OUT]

The pool builder's state machine (the service's, without Kafka) replays MovieLens-100k (items,
100,000 ratings), re-fits 8 user segments, then takes the workload's 256 knowledge texts
(`bench/pool.jsonl`, generated for other users and items) as knowledge records: user texts go to
their author's segment (and neighbourhoods), item texts to their genre. The held-out workload
prompts then draft from the pool of *the builder's* segment for their entity.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dare.benchmarks.single import format_table, run_bench
from dare.benchmarks.workload import POOL_PATH, BenchPrompt, default_prompts
from dare.data import item_events, load_movielens, user_events
from infra.settings import load_settings
from pool_builder.builder import PoolBuilder
from pool_builder.embeddings import TextEncoder
from schemas import DecodeStats, KnowledgeRecord


def build(neighbourhood: float, encoder: TextEncoder, segments: int, pool_cap: int) -> PoolBuilder:
    ml = load_movielens()
    builder = PoolBuilder(encoder, segments=segments, pool_cap=pool_cap, neighbourhood=neighbourhood)
    builder.add_items(list(item_events(ml)))
    for event in user_events(ml):
        builder.add_user_event(event)
    builder.refit()
    for n, line in enumerate(POOL_PATH.read_text().splitlines()):
        row = json.loads(line)
        kind, entity = row["entity"].split("-", 1)
        builder.add_knowledge(KnowledgeRecord(request_id=f"pool-{n}", entity_kind=kind, entity_id=entity, text=row["text"],
                                              token_count=0, mode="ar", model="workload", worker="bench",
                                              stats=DecodeStats(steps=0, new_tokens=0, mean_accepted=0.0, wall_s=0.0)))
    return builder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--pool-cap", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from dare.cli import load_lm

    settings = load_settings(threads=2)
    encoder = TextEncoder()
    lm = load_lm(settings)
    reports = {}
    for name, neighbourhood, methods in (
        ("neighbourhoods (default, 1.5x)", 1.5, ["hf-generate", "dare-relaxed", "dare-relaxed@segment", "dare-relaxed@global", "dare-relaxed@random"]),
        ("members only", 0.0, ["hf-generate", "dare-relaxed@segment", "dare-relaxed@random"]),
    ):
        builder = build(neighbourhood, encoder, args.segments, args.pool_cap)
        pools = {s: [e[1] for e in p.texts.values()] for s, p in builder.pools.items() if p.texts}
        prompts = []
        for p in default_prompts()[: args.limit]:
            kind, entity = p.id.split("-", 1)
            segment = builder.segment_of(kind, entity)
            if segment in pools:
                prompts.append(BenchPrompt(p.id, segment, p.prompt))
        sizes = {s: len(t) for s, t in sorted(pools.items())}
        print(f"\n{name}: pools {sizes}; {len(prompts)} prompts in segments with a pool", file=sys.stderr, flush=True)
        reports[name] = run_bench(lm, prompts, pools, methods, args.max_new_tokens, settings.cache_dir)
        reports[name]["prompt_segments"] = {p.id: p.segment for p in prompts}
    for name, report in reports.items():
        print(f"\n{name}: {len(report['prompts'])} prompts, pool texts per segment {report['pool_texts']}")
        print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(reports, indent=1) + "\n")


if __name__ == "__main__":
    main()
