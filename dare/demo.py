"""`dare demo`: the pipeline end to end, on the embedded broker unless a cluster is named.

Produces KAR prompts for MovieLens users in two phases (greedy seed, then DARE against the
seeded pool), runs a generator worker until each is answered, then reads the knowledge topic
as a downstream consumer would and prints a summary.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import structlog

from dare.data import load_movielens, prompt_request
from dare.settings import Settings
from infra.broker import EmbeddedBroker
from infra.kafka import consume_all, ensure_topics, make_producer, wait_for_broker
from schemas import KnowledgeRecord, Topics, decode, encode

log = structlog.get_logger("demo")


def produce_prompts(settings: Settings, user_ids: list[str], run_id: str, mode: str) -> list[str]:
    ml = load_movielens()
    topics = Topics(settings.topic_prefix)
    producer = make_producer(settings, "demo")
    ids = []
    for user_id in user_ids:
        request = prompt_request(ml, "user", user_id, request_id=f"{run_id}-user-{user_id}", mode=mode)
        producer.send(topics.prompts, key=user_id.encode(), value=encode(request))
        ids.append(request.request_id)
    producer.flush()
    producer.close()
    return ids


def mode_figures(records: list[KnowledgeRecord]) -> dict[str, dict[str, float]]:
    figures = {}
    for mode in sorted({r.mode for r in records}):
        mine = [r for r in records if r.mode == mode]
        tokens = sum(r.token_count for r in mine)
        wall = sum(r.stats.wall_s for r in mine)
        steps = sum(r.stats.steps for r in mine)
        figures[mode] = {"tokens_per_s": tokens / wall if wall else 0.0, "mean_accepted": tokens / steps if steps else 0.0,
                         "prompts": len(mine)}
    return figures


def run_demo(settings: Settings, limit: int = 3, json_path: Path | None = None) -> int:
    """Seed: `limit` users decoded greedily (`ar`); their knowledge fills the worker's pool. Then
    `limit` other users decoded with DARE (`relaxed`) against it; speedup = relaxed / ar tokens/s."""
    from dare.cli import load_lm
    from workers.service import Worker

    start = time.perf_counter()
    run_id = f"demo{int(time.time())}"
    with ExitStack() as stack:
        if not settings.bootstrap_servers:
            broker = stack.enter_context(EmbeddedBroker())
            settings = settings.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})
        print(f"broker: {settings.bootstrap_servers}", flush=True)
        wait_for_broker(settings)
        topics = Topics(settings.topic_prefix)
        ensure_topics(settings, topics.all())
        lm = load_lm(settings)
        users = sorted(load_movielens().users, key=int)
        worker = Worker(settings, lm, mode="ar")
        request_ids = []
        for phase, (mode, batch) in enumerate((("ar", users[:limit]), ("relaxed", users[limit : 2 * limit])), start=1):
            request_ids += produce_prompts(settings, batch, run_id, mode)
            print(f"phase {phase}: {len(batch)} prompts ({mode}) to {topics.prompts}", flush=True)
            stats = worker.run(threading.Event(), max_prompts=len(request_ids), idle_timeout_s=120)

        records = [decode(KnowledgeRecord, r.value) for r in consume_all(settings, topics.knowledge, timeout_s=5)]
        mine = [r for r in records if r.request_id in set(request_ids)]
        answered = {r.request_id for r in mine}
        modes = mode_figures(mine)
        ar_tps = modes.get("ar", {}).get("tokens_per_s", 0.0)
        summary = {
            "prompts": len(request_ids),
            "knowledge_records": len(mine),
            "lost": len(set(request_ids) - answered),
            "duplicates": len(mine) - len(answered),
            "dead_lettered": stats.dead_lettered,
            "modes": modes,
            "speedup_vs_ar": modes.get("relaxed", {}).get("tokens_per_s", 0.0) / ar_tps if ar_tps else 0.0,
            "wall_s": time.perf_counter() - start,
        }
    for record in sorted(mine, key=lambda r: r.created_at)[-2:]:  # the DARE phase
        print(f"\n[{record.request_id}, {record.mode}] {record.text[:300]}{'…' if len(record.text) > 300 else ''}")
    print("\n| prompts | knowledge records | lost | duplicates | dead-lettered | ar tokens/s | relaxed tokens/s | relaxed mean accepted | speedup | wall s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    relaxed = modes.get("relaxed", {"tokens_per_s": 0.0, "mean_accepted": 0.0})
    print(
        f"| {summary['prompts']} | {summary['knowledge_records']} | {summary['lost']} | {summary['duplicates']} "
        f"| {summary['dead_lettered']} | {ar_tps:.1f} | {relaxed['tokens_per_s']:.1f} | {relaxed['mean_accepted']:.2f} "
        f"| {summary['speedup_vs_ar']:.2f}x | {summary['wall_s']:.1f} |"
    )
    if json_path:
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["lost"] == 0 else 1
