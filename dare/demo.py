"""`dare demo`: the pipeline end to end, on the embedded broker unless a cluster is named.

Produces KAR prompts for MovieLens users, runs a generator worker until each is answered,
then reads the knowledge topic as a downstream consumer would and prints a summary.
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


def produce_prompts(settings: Settings, limit: int, run_id: str) -> list[str]:
    ml = load_movielens()
    topics = Topics(settings.topic_prefix)
    producer = make_producer(settings, "demo")
    ids = []
    for user_id in sorted(ml.users, key=int)[:limit]:
        request = prompt_request(ml, "user", user_id, request_id=f"{run_id}-user-{user_id}")
        producer.send(topics.prompts, key=user_id.encode(), value=encode(request))
        ids.append(request.request_id)
    producer.flush()
    producer.close()
    return ids


def run_demo(settings: Settings, limit: int = 3, json_path: Path | None = None) -> int:
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
        request_ids = produce_prompts(settings, limit, run_id)
        print(f"produced {len(request_ids)} prompts to {topics.prompts}", flush=True)

        worker = Worker(settings, lm, mode="ar")
        stats = worker.run(threading.Event(), max_prompts=len(request_ids), idle_timeout_s=120)

        records = [decode(KnowledgeRecord, r.value) for r in consume_all(settings, topics.knowledge, timeout_s=5)]
        mine = [r for r in records if r.request_id in set(request_ids)]
        answered = {r.request_id for r in mine}
        summary = {
            "prompts": len(request_ids),
            "knowledge_records": len(mine),
            "lost": len(set(request_ids) - answered),
            "duplicates": len(mine) - len(answered),
            "dead_lettered": stats.dead_lettered,
            "modes": {"ar": {"tokens_per_s": stats.tokens / stats.decode_s if stats.decode_s else 0.0, "mean_accepted": 1.0}},
            "wall_s": time.perf_counter() - start,
        }
    for record in mine[:3]:
        print(f"\n[{record.request_id}] {record.text[:300]}{'…' if len(record.text) > 300 else ''}")
    print("\n| prompts | knowledge records | lost | duplicates | dead-lettered | ar tokens/s | wall s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {summary['prompts']} | {summary['knowledge_records']} | {summary['lost']} | {summary['duplicates']} "
        f"| {summary['dead_lettered']} | {summary['modes']['ar']['tokens_per_s']:.1f} | {summary['wall_s']:.1f} |"
    )
    if json_path:
        json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["lost"] == 0 else 1
