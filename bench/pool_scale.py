"""Retrieval at scale, without the model: a segment's pool vs one global pool as the catalogue's texts grow.

Strict acceptance needs no model where the greedy output is known: a draft token is accepted exactly when it
is the greedy continuation. Held-out `ar` knowledge texts (the engine's greedy outputs) are the targets; at
each step a draft tree is built from the pools (the worker's drafter: trie lookups of the context's last
tokens, best-first merge), its first `--nodes` nodes are "sent", the path that matches the target is accepted
and the next target token is the bonus, as `dare-strict` decodes. Per step: the draft's build time (what the
worker's retrieval costs) and the tokens emitted.

Texts: every real knowledge text of `--knowledge` but the targets, then synthetic ones up to each size in
`--sizes`: each a splice of 3–6 sentences drawn from random real texts of one kind (so they read like knowledge
and share its phrases), in 1,000 segments of their own. Pools per target, as the worker holds them:

- `segment`: the target's segment's pool: the newest `--pool-cap` texts of that segment (the pool builder's cap);
- `global-capped`: one pool of every text in arrival order, capped at the worker's 1,000,000 trie nodes
  (oldest evicted): what `LivePools` keeps;
- `segment+global-capped`: both, merged (the worker's default);
- `global-all`: one pool of every text, uncapped, where it fits in `--max-global-nodes` (Python tries cost
  ~200 bytes a node); beyond that its nodes are extrapolated from the nodes per text measured.

    .venv/bin/python bench/pool_scale.py --json bench/results/scale_pools.json > bench/results/scale_pools.txt
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path

from infra.settings import default_cache_dir
from workers.engine import PoolTexts, cached_default_model
from workers.engine.algorithm.draft import DraftConfig, DraftTree, RetrievalDrafter
from workers.engine.algorithm.trie import Pool

WORKER_GLOBAL_NODES = 1_000_000  # workers/pools.py LivePools' global pool cap
SENTENCE = re.compile(r"(?<=[.!?])\s+")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def accepted_path(tree: DraftTree, target: list[int], at: int) -> int:
    """How many draft tokens strict acceptance keeps: the longest root path equal to target[at:]."""
    children: dict[int, list[int]] = defaultdict(list)
    for i, parent in enumerate(tree.parents):
        children[parent].append(i)
    position, n = -1, 0
    while at + n < len(target):
        nxt = next((c for c in children[position] if tree.tokens[c] == target[at + n]), None)
        if nxt is None:
            break
        position, n = nxt, n + 1
    return n


def decode_strict(target: list[int], header: list[int], sources: list, config: DraftConfig, nodes: int) -> tuple[int, list[float]]:
    """Steps `dare-strict` takes to emit `target` drafting from `sources`; each step's draft build time (s)."""
    drafter = RetrievalDrafter(sources, config, prompt=header)
    context, at, steps, seconds = list(header), 0, 0, []
    while at < len(target):
        start = time.perf_counter()
        tree = drafter.get_candidates(context).prefix(nodes)
        seconds.append(time.perf_counter() - start)
        emitted = accepted_path(tree, target, at) + 1  # the accepted drafts and the bonus token
        new = target[at : at + emitted]
        context += new
        drafter.update(new)
        at += emitted
        steps += 1
    return steps, seconds


def synthetic_texts(real: list[dict], count: int, rng: random.Random) -> list[dict]:
    by_kind: dict[str, list[list[str]]] = defaultdict(list)
    for r in real:
        by_kind[r["entity_kind"]].append([s for s in SENTENCE.split(r["text"].strip()) if s])
    out = []
    for n in range(count):
        kind = rng.choice(sorted(by_kind))
        sentences = [rng.choice(rng.choice(by_kind[kind])) for _ in range(rng.randint(3, 6))]
        out.append({"entity_kind": kind, "entity_id": f"synthetic-{n}", "segment": f"s{rng.randrange(1000)}", "text": " ".join(sentences)})
    return out


def build(texts: PoolTexts, records: list[dict], max_nodes: int) -> tuple[Pool, float, float]:
    """A pool of `records` arrived in order, oldest evicted past `max_nodes`; its build seconds and the
    process's memory growth (MB). What is left is the newest texts that fit, so they are inserted newest
    first until the cap is passed, and the one that passed it (the oldest) removed: the same pool, without
    indexing texts only to evict them."""
    before, start = rss_mb(), time.perf_counter()
    pool = Pool(depth=texts.depth, max_nodes=10**12)
    for r in reversed(records):
        text_id = f"{r['entity_kind']}-{r['entity_id']}"
        texts.add_text(pool, text_id, r["text"])
        if pool.nodes > max_nodes:
            pool.remove(text_id)
            break
    pool.max_nodes = max_nodes
    return pool, time.perf_counter() - start, rss_mb() - before


def main() -> None:
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--knowledge", default="results/knowledge/ml-100k-ar.jsonl", help="`ar` knowledge records (JSONL)")
    parser.add_argument("--targets", type=int, default=120, help="held-out texts decoded (half users, half items)")
    parser.add_argument("--sizes", default="0,10000,100000", help="total texts (real + synthetic); 0: the real ones only")
    parser.add_argument("--pool-cap", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=16, help="draft nodes sent per step")
    parser.add_argument("--max-global-nodes", type=int, default=12_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(cached_default_model(default_cache_dir()))
    config = DraftConfig()
    texts = PoolTexts(tokenizer, config)
    header = texts.assistant_prefix
    records = [json.loads(line) for line in Path(args.knowledge).read_text().splitlines() if line.strip()]
    rng.shuffle(records)  # arrival order
    targets = ([r for r in records if r["entity_kind"] == "user"][: args.targets // 2]
               + [r for r in records if r["entity_kind"] == "item"][: args.targets - args.targets // 2])
    held = {id(r) for r in targets}
    real = [r for r in records if id(r) not in held]
    goals = [tokenizer.encode(r["text"], add_special_tokens=False) for r in targets]
    by_segment: dict[str, list[dict]] = defaultdict(list)
    for r in real:
        by_segment[r["segment"]].append(r)
    segment_pools = {s: build(texts, rs[-args.pool_cap :], 10**9)[0] for s, rs in by_segment.items()}
    print(f"# {len(records)} texts in {args.knowledge} ({len(targets)} held out as targets, {sum(map(len, goals))} tokens); "
          f"{len(segment_pools)} real segments, pools of at most {args.pool_cap} texts (median "
          f"{statistics.median(len(p) for p in segment_pools.values())}); {args.nodes} draft nodes a step; trie depth {texts.depth}\n")

    points = []
    bytes_per_node, nodes_per_text = 300.0, 0.0  # of the largest global-all pool built (until then: guesses)
    print("| texts | pools | pool nodes | build s | memory MB | tokens/step | retrieval ms/draft p50 | p95 |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in (int(s) for s in args.sizes.split(",")):
        corpus = real + synthetic_texts(real, max(0, size - len(real)), random.Random(args.seed + size))
        if size:
            random.Random(args.seed).shuffle(corpus)  # synthetic texts arrive among the real ones
        capped, capped_s, capped_mb = build(texts, corpus, WORKER_GLOBAL_NODES)
        # texts share ever more of their paths as they grow: the nodes per text of the largest pool built so far
        # (else of the first 2,000 texts) bound a larger pool's from above
        nodes_per_text = nodes_per_text or build(texts, corpus[:2000], 10**9)[0].nodes / min(2000, len(corpus))
        fits = nodes_per_text * len(corpus) <= args.max_global_nodes
        configs = {"segment": (None, "segment"), "global-capped": ((capped, capped_s, capped_mb), "global"),
                   "segment+global-capped": ((capped, capped_s, capped_mb), "both")}
        if fits:
            configs["global-all"] = (built := build(texts, corpus, 10**9), "global")
            bytes_per_node, nodes_per_text = built[2] * 1e6 / max(1, built[0].nodes), built[0].nodes / len(corpus)
        for name, (pool, use) in configs.items():
            steps, seconds = 0, []
            for record, goal in zip(targets, goals):
                sources = []
                own = segment_pools.get(record["segment"])
                if use in ("segment", "both") and own is not None:
                    sources.append((own, 1.0))
                if use in ("global", "both"):
                    sources.append((pool[0], 1.0))
                s, t = decode_strict(goal, header, sources, config, args.nodes)
                steps += s
                seconds += t
            nodes = (sum(p.nodes for p in segment_pools.values()) / len(segment_pools)) if pool is None else pool[0].nodes
            point = {"texts": len(corpus), "pools": name, "pool_nodes": round(nodes), "build_s": None if pool is None else round(pool[1], 2),
                     "memory_mb": None if pool is None else round(pool[2]), "tokens_per_step": sum(map(len, goals)) / steps,
                     "retrieval_ms_per_draft": 1000 * statistics.median(seconds),
                     "retrieval_ms_p95": 1000 * statistics.quantiles(seconds, n=20)[-1]}
            points.append(point)
            print(f"| {len(corpus):,} | {name} | {point['pool_nodes']:,} | {point['build_s'] if pool else '-'} | "
                  f"{point['memory_mb'] if pool else '-'} | {point['tokens_per_step']:.2f} | {point['retrieval_ms_per_draft']:.2f} | "
                  f"{point['retrieval_ms_p95']:.2f} |", flush=True)
        if not fits:
            nodes = nodes_per_text * len(corpus)
            print(f"| {len(corpus):,} | global-all | < {nodes:,.0f} (extrapolated) | - | < {nodes * bytes_per_node / 1e6:,.0f} "
                  f"(at {bytes_per_node:.0f} B a node) | does not fit --max-global-nodes | - | - |")
            points.append({"texts": len(corpus), "pools": "global-all", "pool_nodes_at_most": round(nodes),
                           "memory_mb_at_most": round(nodes * bytes_per_node / 1e6), "fits": False})
        del capped
    if args.json:
        args.json.write_text(json.dumps({"knowledge": args.knowledge, "targets": len(targets), "nodes_per_step": args.nodes,
                                         "pool_cap": args.pool_cap, "points": points}, indent=1) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
