"""Worker figures: the Kafka path's cost against the bare engine on the same prompts, and a
backlog processed by one worker against two (one torch thread each).

    .venv/bin/python bench/worker_bench.py [--prompts 16] [--mode relaxed] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack

import torch

from dare.data import load_movielens, prompt_request
from dare.settings import Settings
from infra.broker import EmbeddedBroker
from infra.kafka import consume_all, ensure_topics, make_producer
from schemas import KnowledgeRecord, Topics, decode, encode


def backlog(settings: Settings, n: int, mode: str, tag: str) -> list:  # type: ignore[type-arg]
    ml = load_movielens()
    requests = [prompt_request(ml, "item", str(i + 1), request_id=f"{tag}-{i}", mode=mode) for i in range(n)]
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.all())
    producer = make_producer(settings, "bench")
    for r in requests:
        producer.send(topics.prompts, key=r.entity_id.encode(), value=encode(r))
    producer.flush()
    return requests


def run_workers(settings: Settings, count: int, n: int, max_new: int) -> float:
    """Seconds from the first prompt's decode start to the last record, with `count` worker processes."""
    env = os.environ | {"DARE_BOOTSTRAP_SERVERS": settings.bootstrap_servers, "DARE_TOPIC_PREFIX": settings.topic_prefix,
                        "DARE_MAX_NEW_TOKENS": str(max_new), "DARE_THREADS": "1", "DARE_LOG_FORMAT": "json"}
    procs = [subprocess.Popen([sys.executable, "-m", "dare.cli", "worker", "--device", "cpu", "--idle-exit", "10"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True) for _ in range(count)]
    try:
        for p in procs:
            p.wait(1800)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    records = [decode(KnowledgeRecord, r.value) for r in consume_all(settings, Topics(settings.topic_prefix).knowledge, timeout_s=3)]
    assert len({r.request_id for r in records}) == n, "lost prompts"
    return max(r.created_at for r in records) - min(r.created_at - r.stats.wall_s for r in records), records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--mode", default="relaxed")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from dare.cli import load_lm
    from workers.service import Worker

    with ExitStack() as stack:
        servers = os.environ.get("DARE_BOOTSTRAP_SERVERS") or stack.enter_context(EmbeddedBroker()).bootstrap_servers
        base = Settings(bootstrap_servers=servers, threads=1, max_new_tokens=args.max_new_tokens)

        # The bare engine: the same answer() a worker runs, without Kafka, in this process.
        lm = load_lm(base)
        worker = Worker(base, lm, mode=args.mode)
        requests = backlog(base.model_copy(update={"topic_prefix": "unused."}), args.prompts, args.mode, "bare")
        start = time.perf_counter()
        for r in requests:
            worker.answer(r)
        bare_s = time.perf_counter() - start

        one = base.model_copy(update={"topic_prefix": f"wb1-{int(time.time())}."})
        backlog(one, args.prompts, args.mode, "one")
        one_s, _ = run_workers(one, 1, args.prompts, args.max_new_tokens)
        two = base.model_copy(update={"topic_prefix": f"wb2-{int(time.time())}."})
        backlog(two, args.prompts, args.mode, "two")
        two_s, _ = run_workers(two, 2, args.prompts, args.max_new_tokens)
    print(f"{args.prompts} item prompts, mode {args.mode}, {args.max_new_tokens} new tokens, 1 torch thread per worker")
    print("| figure | value | target |")
    print("| --- | ---: | --- |")
    print(f"| bare engine, same prompts | {bare_s:.1f} s ({bare_s / args.prompts:.2f} s/prompt) | |")
    print(f"| one worker through Kafka | {one_s:.1f} s ({one_s / args.prompts:.2f} s/prompt) | |")
    print(f"| Kafka path cost | {100 * (one_s - bare_s) / bare_s:+.1f}% of decode time | <= 5% |")
    print(f"| two workers, same backlog | {two_s:.1f} s: {one_s / two_s:.2f}x one worker | >= 1.7x |")


if __name__ == "__main__":
    main()
