"""`dare demo`: the whole pipeline, as separate processes (`dare/pipeline.py`), on the embedded
broker unless a cluster is named.

    broker ─ item/user events ─▶ pool builder ─ pools, assignments ─▶ worker(s)
           ─ prompts (seed: ar, then DARE: relaxed) ─────────────────▶ worker(s)
           ◀─ knowledge ─ worker(s)   (the pool builder adds it to its segment's pool)

The demo process replays MovieLens-100k events, waits until every user has a segment, picks
seed/target user pairs that share a segment, produces the seed prompts (plain greedy `ar`),
waits until their knowledge is in the published pools, produces the target prompts (DARE
`relaxed`), and reads the knowledge topic as a downstream consumer would: live progress,
then a summary and the records as JSONL. Ctrl-C or SIGTERM stops every process it started.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from dare.data import load_movielens, prompt_request
from dare.pipeline import Pipeline, PipelineError, pipeline, prepare_model
from infra.kafka import produce
from infra.reader import TopicReader
from infra.settings import Settings
from schemas import KnowledgeRecord, Mode, PoolReplica, PoolUpdate, decode

SEED_MODE: Mode = "ar"
DARE_MODE: Mode = "relaxed"


def mode_figures(records: list[KnowledgeRecord]) -> dict[str, dict[str, float]]:
    """Per mode: tokens/s over decode time (the workers' own clocks), tokens per forward pass."""
    figures = {}
    for mode in sorted({r.mode for r in records}):
        mine = [r for r in records if r.mode == mode]
        tokens = sum(r.token_count for r in mine)
        wall = sum(r.stats.wall_s for r in mine)
        steps = sum(r.stats.steps for r in mine)
        figures[mode] = {"tokens_per_s": tokens / wall if wall else 0.0, "mean_accepted": tokens / steps if steps else 0.0,
                         "prompts": len(mine)}
    return figures


def speedup(modes: dict[str, dict[str, float]]) -> float:
    ar = modes.get(SEED_MODE, {}).get("tokens_per_s", 0.0)
    return modes.get(DARE_MODE, {}).get("tokens_per_s", 0.0) / ar if ar else 0.0


# ---------------------------------------------------------------------------- the phases


@dataclass
class Demo:
    run: Pipeline
    limit: int

    def pick_users(self, segment_of: dict[str, str]) -> list[tuple[str, str]]:
        """`limit` (seed, target) user pairs from the same segment, spread over the segments."""
        by_segment: dict[str, list[str]] = defaultdict(list)
        for user in sorted(segment_of, key=int):
            by_segment[segment_of[user]].append(user)
        queues = sorted(by_segment.values(), key=len, reverse=True)
        pairs: list[tuple[str, str]] = []
        while len(pairs) < self.limit and any(len(q) >= 2 for q in queues):
            for queue in queues:
                if len(queue) >= 2 and len(pairs) < self.limit:
                    pairs.append((queue.pop(0), queue.pop(0)))
        if len(pairs) < self.limit:
            raise PipelineError(f"--limit {self.limit}: only {len(pairs)} seed/target user pairs share a segment")
        return pairs

    def produce_prompts(self, users: list[str], mode: str) -> set[str]:
        ml = load_movielens()
        run_id = self.run.log_dir.name
        requests = [prompt_request(ml, "user", u, request_id=f"{run_id}-{mode}-user-{u}", mode=mode) for u in users]
        produce(self.run.settings, self.run.topics.prompts, self.run.with_segments(requests))  # keyed by segment
        return {r.request_id for r in requests}

    def wait_for_answers(self, request_ids: set[str], all_ids: set[str], phase: str) -> None:
        run = self.run
        deadline = time.monotonic() + run.timeout_s
        while True:
            run.read_downstream()
            mine = [r for r in run.results.knowledge if r.request_id in all_ids]
            done = len(run.results.answered(request_ids))
            modes = mode_figures(mine)
            current = modes.get(DARE_MODE if phase == DARE_MODE else SEED_MODE, {})
            line = (f"{phase}: {done}/{len(request_ids)} prompts · {current.get('tokens_per_s', 0.0):.1f} tokens/s "
                    f"· mean accepted {current.get('mean_accepted', 0.0):.2f}")
            if DARE_MODE in modes:
                line += f" · speedup {speedup(modes):.2f}x"
            run.progress.show(line + f" · dead letters {len(run.results.dead_letters)}")
            if done == len(request_ids):
                run.progress.done()
                return
            run.processes.check()
            if time.monotonic() > deadline:
                run.progress.done()
                raise PipelineError(f"{phase}: {done} of {len(request_ids)} prompts answered within {run.timeout_s:.0f}s")

    def wait_for_pools(self, texts: set[str]) -> None:
        """Until the pool builder has published every seed text (workers read the same topic)."""
        run = self.run
        deadline = time.monotonic() + run.timeout_s
        replica, published = PoolReplica(), set()
        with TopicReader(run.settings, [run.topics.pools], role="demo") as reader:
            while not texts <= published:
                run.processes.check()
                if time.monotonic() > deadline:
                    raise PipelineError(f"{len(texts - published)} seed texts did not reach a published pool in {run.timeout_s:.0f}s")
                for record in reader.poll():
                    replica.apply(decode(PoolUpdate, record.value))
                published = {text_id for pool in replica.pools.values() for text_id in pool}
        print(f"pools: the {len(texts)} seed texts are in their segments' pools", flush=True)


def run_demo(settings: Settings, limit: int = 3, workers: int = 1, ratings: int | None = None,
             json_path: Path | None = None, records_path: Path | None = None, timeout_s: float = 600.0,
             broker_port: int | None = None) -> int:
    start = time.perf_counter()
    threads = settings.threads or max(1, (os.cpu_count() or 1) // workers)
    embedded = not settings.bootstrap_servers
    try:
        with pipeline(settings, "demo", timeout_s, broker_port) as run:
            demo = Demo(run, limit)
            prepare_model(run.settings, threads)
            run.start_pool_builder("--segments", "4", "--refit-every", "5")
            users = run.replay_events(ratings)
            run.start_workers(workers, threads)
            pairs = demo.pick_users(run.wait_for_segments(users))

            seeds = demo.produce_prompts([s for s, _ in pairs], SEED_MODE)
            targets: set[str] = set()
            print(f"phase 1: {len(seeds)} seed prompts ({SEED_MODE}) to {run.topics.prompts}", flush=True)
            demo.wait_for_answers(seeds, seeds, SEED_MODE)
            demo.wait_for_pools({f"user-{s}" for s, _ in pairs})
            targets = demo.produce_prompts([t for _, t in pairs], DARE_MODE)
            print(f"phase 2: {len(targets)} prompts ({DARE_MODE}) for users in the seeds' segments", flush=True)
            demo.wait_for_answers(targets, seeds | targets, DARE_MODE)
            run.read_downstream(timeout_ms=1000)  # duplicates that arrive late
            run.processes.check()
    except KeyboardInterrupt:
        print("\ninterrupted: stopped the processes the demo started" + (" and the broker" if embedded else ""),
              file=sys.stderr, flush=True)
        return 130

    request_ids = seeds | targets
    mine = [r for r in run.results.knowledge if r.request_id in request_ids]
    modes = mode_figures(mine)
    summary = {
        "prompts": len(request_ids),
        "knowledge_records": len(mine),
        "lost": len(request_ids - run.results.answered(request_ids)),
        "duplicates": len(mine) - len({r.request_id for r in mine}),
        "dead_lettered": len(run.results.dead_letters),
        "modes": modes,
        "speedup_vs_ar": speedup(modes),
        "wall_s": time.perf_counter() - start,
        "workers": workers,
        "bootstrap_servers": run.settings.bootstrap_servers,
        "logs": str(run.log_dir),
    }
    records_path = records_path or Path("demo-knowledge.jsonl")
    with records_path.open("w", encoding="utf-8") as f:
        for record in mine:
            f.write(record.model_dump_json() + "\n")
    print_summary(summary, mine, records_path)
    if json_path:
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["lost"] == 0 else 1


def print_summary(summary: dict, records: list[KnowledgeRecord], records_path: Path) -> None:  # type: ignore[type-arg]
    for record in [r for r in records if r.mode == DARE_MODE][-2:]:
        print(f"\n[{record.request_id}, segment {record.segment}, {record.stats.mean_accepted:.2f} tokens/step] "
              f"{record.text[:300]}{'…' if len(record.text) > 300 else ''}")
    modes = summary["modes"]
    ar = modes.get(SEED_MODE, {"tokens_per_s": 0.0})
    dare = modes.get(DARE_MODE, {"tokens_per_s": 0.0, "mean_accepted": 0.0})
    print(f"\n| prompts | knowledge records | lost | duplicates | dead-lettered | {SEED_MODE} tokens/s | {DARE_MODE} tokens/s "
          f"| {DARE_MODE} mean accepted | speedup | wall s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {summary['prompts']} | {summary['knowledge_records']} | {summary['lost']} | {summary['duplicates']} "
          f"| {summary['dead_lettered']} | {ar['tokens_per_s']:.1f} | {dare['tokens_per_s']:.1f} | {dare['mean_accepted']:.2f} "
          f"| {summary['speedup_vs_ar']:.2f}x | {summary['wall_s']:.1f} |")
    print(f"\nknowledge records: {records_path} · service logs: {summary['logs']}")
