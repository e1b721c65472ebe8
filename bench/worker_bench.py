"""Worker figures: what the Kafka path costs per prompt, and how a backlog scales from one worker
to two (one torch thread each on this 2-core machine).

    .venv/bin/python -P bench/worker_bench.py [--prompts 24] [--mode relaxed] [--max-new-tokens 64] [--batch B]

Set-up, the same for every run: the default bench workload's held-out prompts (`bench/workload.json`)
and its pools (`bench/pool.jsonl`) published to the pools topic as the pool builder would, so every
worker drafts from the same pools. Workers are started and ready (partitions assigned, pools loaded)
before the backlog is produced; prompts are spread round-robin over the 4 partitions so that two
workers get equal shares (keyed production balances only over many entities).

- Kafka path cost: one worker's wall time from its first decode start to its last record, against
  the sum of its decode times (the `answer()` clocks in the records), and against the bare engine
  decoding the same prompts in the same order in this process.
- Scaling: the same backlog with two workers, wall time against one worker's.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from itertools import pairwise
from statistics import median

import torch

from dare.benchmarks.workload import POOL_PATH, default_prompts, read_pool
from infra.broker import EmbeddedBroker, free_port
from infra.kafka import ensure_topics, make_producer
from infra.reader import read_topic
from infra.settings import Settings
from schemas import KnowledgeRecord, PoolText, PoolUpdate, PromptRequest, Topics, decode, encode

PARTITIONS = 4


def requests(n: int, mode: str, max_new: int) -> list[PromptRequest]:
    prompts = default_prompts()
    out = []
    for i in range(n):
        p = prompts[i % len(prompts)]
        kind, entity = p.id.split("-", 1)
        out.append(PromptRequest(request_id=f"{p.id}-{i}", entity_kind=kind, entity_id=entity, segment=p.segment,  # type: ignore[arg-type]
                                 prompt=p.prompt, mode=mode, max_new_tokens=max_new))  # type: ignore[arg-type]
    return out


def publish_pools(settings: Settings) -> None:
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.all(), partitions=PARTITIONS)
    producer = make_producer(settings, "bench")
    for segment, texts in read_pool(POOL_PATH).items():
        added = [PoolText(text_id=f"{segment}-{i}", text=t) for i, t in enumerate(texts)]
        producer.send(topics.pools, key=segment.encode(), value=encode(PoolUpdate(segment=segment, version=1, kind="snapshot", added=added)))
    producer.flush()
    producer.close()


def produce_backlog(settings: Settings, backlog: list[PromptRequest]) -> None:
    producer = make_producer(settings, "bench")
    for i, request in enumerate(backlog):
        producer.send(Topics(settings.topic_prefix).prompts, key=request.entity_id.encode(), value=encode(request), partition=i % PARTITIONS)
    producer.flush()
    producer.close()


def ready(port: int) -> bool:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read().decode()
    except OSError:
        return False
    return any(line.startswith("dare_worker_ready ") and float(line.split()[1]) == 1.0 for line in text.splitlines())


def run_workers(settings: Settings, count: int, backlog: list[PromptRequest], batch: int = 1, extra: tuple[str, ...] = (),
                threads: int = 1) -> list[KnowledgeRecord]:
    env = os.environ | {"DARE_BOOTSTRAP_SERVERS": settings.bootstrap_servers, "DARE_TOPIC_PREFIX": settings.topic_prefix,
                        "DARE_THREADS": str(threads), "DARE_LOG_FORMAT": "json", "DARE_LOG_LEVEL": "warning"}
    ports = [free_port() for _ in range(count)]
    logs = [tempfile.TemporaryFile() for _ in ports]  # noqa: SIM115 (closed in the finally below)
    procs = [subprocess.Popen([sys.executable, "-P", "-m", "dare.cli", "worker", "--device", "cpu", "--metrics-port", str(port),
                               "--max-prompts", str(len(backlog)), "--batch", str(batch), *extra], env=env, stdout=subprocess.DEVNULL,
                              stderr=log, start_new_session=True) for port, log in zip(ports, logs)]
    try:
        deadline = time.monotonic() + 300
        while not all(ready(p) for p in ports):  # joined, partitions split, pools loaded
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                tails = []
                for proc, log in zip(procs, logs):
                    log.seek(0)
                    tails.append(f"(exit status {proc.poll()})\n" + log.read().decode(errors="replace")[-3000:])
                raise RuntimeError("workers did not get ready; their stderr ends:\n" + "\n---\n".join(tails))
            time.sleep(0.5)
        time.sleep(2)  # let the last rebalance settle
        produce_backlog(settings, backlog)
        ids = {r.request_id for r in backlog}
        while True:
            records = [decode(KnowledgeRecord, r.value) for r in read_topic(settings, Topics(settings.topic_prefix).knowledge, timeout_s=1)]
            if ids <= {r.request_id for r in records}:
                return records
            assert time.monotonic() < deadline + 1800, "backlog not answered"
            time.sleep(2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for log in logs:
            log.close()


def span(records: list[KnowledgeRecord]) -> float:
    return max(r.created_at for r in records) - min(r.created_at - r.stats.wall_s for r in records)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--mode", default="relaxed")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=0, help="also run one worker with --batch B")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from dare.cli import load_lm
    from workers.service import Worker

    backlog = requests(args.prompts, args.mode, args.max_new_tokens)
    with ExitStack() as stack:
        servers = os.environ.get("DARE_BOOTSTRAP_SERVERS") or stack.enter_context(EmbeddedBroker()).bootstrap_servers
        base = Settings(bootstrap_servers=servers, threads=1, max_new_tokens=args.max_new_tokens)
        runs = {}
        for count, batch in ((1, 1), (2, 1), *([(1, args.batch)] if args.batch > 1 else [])):
            settings = base.model_copy(update={"topic_prefix": f"wb{count}x{batch}-{int(time.time())}."})
            publish_pools(settings)
            runs[count if batch == 1 else f"batch{batch}"] = run_workers(settings, count, backlog, batch)

    # The bare engine: the same answer() a worker runs, same pools, same order, no Kafka.
    one = sorted(runs[1], key=lambda r: r.created_at)
    worker = Worker(base, load_lm(base), mode=args.mode)
    for segment, texts in read_pool(POOL_PATH).items():
        for i, text in enumerate(texts):
            worker.pools.add_text(segment, f"{segment}-{i}", text)
    by_id = {r.request_id: r for r in backlog}
    worker.answer(backlog[0].model_copy(update={"max_new_tokens": 4}))  # warm, as the workers were
    bare = []
    for record in one:
        start = time.perf_counter()
        worker.answer(by_id[record.request_id])
        bare.append(time.perf_counter() - start)

    decode_s = sum(r.stats.wall_s for r in one)
    one_s, two_s = span(runs[1]), span(runs[2])
    gaps = [b.created_at - b.stats.wall_s - a.created_at for a, b in pairwise(one)]
    split = {w: sum(1 for r in runs[2] if r.worker == w) for w in {r.worker for r in runs[2]}}
    print(f"{args.prompts} prompts (default workload, its pools on the pools topic), mode {args.mode}, "
          f"{args.max_new_tokens} new tokens, 1 torch thread per worker")
    print("| figure | value | target |")
    print("| --- | ---: | --- |")
    print(f"| bare engine, same prompts, same order | {sum(bare):.1f} s ({sum(bare) / len(bare):.2f} s/prompt) | |")
    print(f"| one worker through Kafka, first decode start to last record | {one_s:.1f} s | |")
    print(f"| ... of which decoding (sum of the records' decode times) | {decode_s:.1f} s | |")
    print(f"| Kafka path cost: wall vs own decode time | {100 * (one_s - decode_s) / decode_s:+.1f}% "
          f"(median gap between prompts {1000 * median(gaps):.0f} ms) | <= 5% |")
    print(f"| one worker vs bare engine | {100 * (one_s - sum(bare)) / sum(bare):+.1f}% | |")
    print(f"| two workers, same backlog | {two_s:.1f} s: {one_s / two_s:.2f}x one worker (prompts per worker: "
          f"{sorted(split.values())}) | >= 1.7x |")
    if args.batch > 1:
        batched = runs[f"batch{args.batch}"]
        print(f"| one worker, --batch {args.batch} (continuous batching, one torch thread) | {span(batched):.1f} s: "
              f"{one_s / span(batched):.2f}x one worker at batch 1 | |")


if __name__ == "__main__":
    main()
