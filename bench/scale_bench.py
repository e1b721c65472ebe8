"""Scale-out, measured through the real broker: one and two pool builders, and what two workers hold.

1. **Pool builders.** A synthetic catalogue (`dare data synth`: power-law users and items, genre tastes) is
   replayed to a fresh set of topics (its item events, then its ratings as a backlog); then 1, and on another set
   of topics 2, pool-builder members (spawned processes of their own, `PoolBuilderService` with the packaged
   MiniLM, torch threads split between them) consume it. Per run: the seconds until every item is encoded (each member encodes
   every item), the ratings' ingest rate after that (ratings / seconds from the last member's items to the last
   rating applied), the seconds until every user's assignment is on the `assignments` topic, each member's peak
   RSS, and the segments' quality: the mean cosine distance of every user to its segment's centroid (k-means
   inertia on unit vectors), from the members' checkpoints; the CPU seconds of each member, the broker and this
   process while the ratings are applied; the ratings each member applied. `--partitions`: of these topics (the
   system creates 4; power-law users split unevenly over few).
2. **Two workers' pools.** `--segments-for-pools` segment pools of `--pool-cap` knowledge texts each (sentences of
   the catalogue file's real texts, spliced) are published to the pools topic as the pool builder does; a worker's
   `PoolFollower` then follows half of the 4 prompt partitions, the other half, and all of them: texts, trie nodes
   and the time to load, per share. One worker's tries of 1,000 such pools would not fit this machine's memory, so
   the split of `--share-segments` segments is counted from the partitioner alone.

    .venv/bin/python -P bench/scale_bench.py --json bench/results/scale.json > bench/results/scale.txt
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import resource
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from dare.data import item_events, load_catalogue, user_events
from infra.broker import EmbeddedBroker
from infra.kafka import ensure_topics, make_producer, produce
from infra.process import cpu_seconds
from infra.reader import TopicReader
from infra.settings import Settings
from pool_builder import checkpoint
from schemas import PoolText, PoolUpdate, SegmentAssignment, Topics, decode, encode

SENTENCE = re.compile(r"(?<=[.!?])\s+")


def member(settings: Settings, state_dir: Path, segments: int, threads: int, progress, stop) -> None:  # type: ignore[no-untyped-def]
    """One pool-builder member; reports (items encoded, ratings applied, peak RSS MB, CPU seconds) into `progress`."""
    import torch

    from pool_builder.embeddings import TextEncoder
    from pool_builder.service import PoolBuilderService

    torch.set_num_threads(threads)
    service = PoolBuilderService(settings, state_dir, segments=segments, pool_cap=64, encoder=TextEncoder(), refit_every_s=10.0)
    done = threading.Event()
    thread = threading.Thread(target=service.run, args=(done,), daemon=True)
    thread.start()
    while not stop.is_set() and thread.is_alive():
        counters = service.counters
        progress[:] = [counters.item_events, counters.user_events, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                       cpu_seconds()]
        time.sleep(0.1)
    done.set()
    thread.join(120)
    progress[2] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_builders(servers: str, catalogue, members: int, segments: int, users_with_ratings: int,  # type: ignore[no-untyped-def]
                 broker_pid: int | None = None, partitions: int = 4) -> dict:
    """`members` pool builders over the catalogue, on fresh topics of `partitions` partitions. Besides the rates and
    times: the CPU seconds each process used while the ratings were applied (from the last member's items to the
    last rating): the members', the broker's and this process's own (it reads every assignment)."""
    settings = Settings(bootstrap_servers=servers, topic_prefix=f"scale{members}x{int(time.time())}.")
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.all(), partitions=partitions)
    items = list(item_events(catalogue))
    start = time.perf_counter()
    produce(settings, topics.item_events, items)
    ratings = produce(settings, topics.user_events, user_events(catalogue))
    replay_s = time.perf_counter() - start
    print(f"  replayed {len(items):,} items and {ratings:,} ratings in {replay_s:.0f}s", flush=True)
    context = multiprocessing.get_context("spawn")  # a fresh process: it shares none of this one's catalogue
    stop = context.Event()
    progress = [context.Array("d", 4) for _ in range(members)]
    state = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    procs = [context.Process(target=member, args=(settings, state / f"m{n}", segments, max(1, 2 // members), progress[n], stop), daemon=True)
             for n in range(members)]
    start = time.perf_counter()
    for proc in procs:
        proc.start()
    assigned: dict[str, str] = {}
    reader = TopicReader(settings, [topics.assignments], wait_s=10)
    items_s = ratings_s = assigned_s = None
    while assigned_s is None or ratings_s is None:
        for record in reader.poll(timeout_ms=200):
            a = decode(SegmentAssignment, record.value)
            if a.entity_kind == "user":
                assigned[a.entity_id] = a.segment
        now = time.perf_counter() - start
        if items_s is None and all(p[0] >= len(items) for p in progress):
            items_s, cpu_at_items = now, cpu_now(progress, broker_pid)
        if ratings_s is None and sum(p[1] for p in progress) >= ratings:
            ratings_s, cpu_at_ratings = now, cpu_now(progress, broker_pid)
        if assigned_s is None and len(assigned) >= users_with_ratings:
            assigned_s = now
        if now > 3600:
            raise TimeoutError(f"{members} member(s): not done after an hour ({sum(p[1] for p in progress):,.0f} ratings applied)")
    reader.close()
    time.sleep(6)  # a checkpoint after the last event
    stop.set()
    for proc in procs:
        proc.join(180)
    cpu = {k: np.round(np.subtract(cpu_at_ratings[k], cpu_at_items[k]), 1).tolist() for k in cpu_at_items}
    return {"members": members, "partitions": partitions, "ratings": ratings, "items": len(items), "users": len(assigned), "replay_s": replay_s,
            "ratings_per_member": [round(p[1]) for p in progress],
            "items_encoded_s": items_s, "ratings_done_s": ratings_s, "all_assigned_s": assigned_s,
            "ingest_events_per_s": ratings / (ratings_s - items_s), "peak_rss_mb": [round(p[2]) for p in progress],
            "inertia": inertia(state), "cpu_s_while_ingesting": cpu,
            "member_cpu_us_per_rating": 1e6 * sum(cpu["members"]) / ratings}


def cpu_now(progress, broker_pid: int | None) -> dict:  # type: ignore[no-untyped-def]
    return {"members": [p[3] for p in progress], "broker": cpu_seconds(broker_pid) if broker_pid else 0.0, "bench": cpu_seconds()}


def inertia(state: Path) -> float:
    """Mean 1 − cos(user, its segment's centroid) over every user, from the members' partition checkpoints."""
    from pool_builder.embeddings import DIM

    class NoEncoder:
        def encode(self, texts):  # type: ignore[no-untyped-def]
            return np.zeros((len(texts), DIM), np.float32)

    distances, centroids_version = [], -1
    builders = [checkpoint.load(path, NoEncoder()) for path in sorted(state.glob("m*/pool_builder-p*.ckpt"))]
    latest = max(builders, key=lambda b: b.centroids_version)
    centroids_version = latest.centroids_version
    for builder in builders:
        ids, matrix = builder.users.matrix()
        rows = [int(builder.user_segment[u][1:]) for u in ids]
        distances.append(1.0 - (matrix * latest.centroids[rows]).sum(1))  # type: ignore[index]
    all_distances = np.concatenate(distances)
    print(f"  inertia over {len(all_distances):,} users, centroids version {centroids_version}", flush=True)
    return float(all_distances.mean())


def worker_shares(servers: str, knowledge: Path, segments: int, pool_cap: int) -> dict:  # type: ignore[no-untyped-def]
    """Publish `segments` pools of `pool_cap` texts; follow half, the other half and all prompt partitions."""
    from transformers import AutoTokenizer

    from infra.settings import default_cache_dir
    from workers.engine import PoolTexts, cached_default_model
    from workers.engine.algorithm.draft import DraftConfig
    from workers.pools import LivePools, PoolFollower

    settings = Settings(bootstrap_servers=servers, topic_prefix=f"shares{int(time.time())}.")
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.all())
    sentences = [s for line in knowledge.read_text().splitlines() for s in SENTENCE.split(json.loads(line)["text"]) if s.strip()]
    rng = random.Random(0)
    producer = make_producer(settings, "bench", linger_ms=20, batch_size=256 * 1024)
    for s in range(segments):
        texts = [PoolText(text_id=f"t{s}-{n}", text=" ".join(rng.sample(sentences, 4))) for n in range(pool_cap)]
        for chunk in range(0, pool_cap, 50):
            update = PoolUpdate(segment=f"u{s}", version=1, kind="snapshot", added=texts[chunk : chunk + 50], chunk=chunk // 50,
                                chunks=(pool_cap + 49) // 50)
            producer.send(topics.pools, key=update.segment.encode(), value=encode(update))
    producer.flush()
    producer.close()
    tokenizer = AutoTokenizer.from_pretrained(cached_default_model(default_cache_dir()))
    out = {}
    for name, partitions in (("worker A", {0, 1}), ("worker B", {2, 3}), ("one worker", {0, 1, 2, 3})):
        live = LivePools(PoolTexts(tokenizer, DraftConfig()))
        follower = PoolFollower(settings, live, partitioned=True)
        start = time.perf_counter()
        follower.follow(partitions, 4)
        load_s = time.perf_counter() - start
        out[name] = {"partitions": sorted(partitions), "segments": len(live.pools), "texts": sum(len(p) for p in live.pools.values()),
                     "segment_nodes": sum(p.nodes for p in live.pools.values()), "load_s": load_s}
        follower.close()
        print(f"  {name}: {out[name]}", flush=True)
    out["worker_pool_share"] = max(out[w]["segment_nodes"] for w in ("worker A", "worker B")) / out["one worker"]["segment_nodes"]
    out["nodes_per_segment"] = out["one worker"]["segment_nodes"] / segments
    out["load_s_per_segment"] = out["one worker"]["load_s"] / segments
    return out


def partition_share(segments: int, partitions: int = 4) -> float:
    """The largest share of `segments` equal pools that one of two workers (half the prompt partitions each) holds:
    segments land on partitions by the producers' hash of their name, as their pools do."""
    from infra.kafka import partition_for

    counts = np.bincount([partition_for(f"u{s}".encode(), partitions) for s in range(segments)], minlength=partitions)
    half = partitions // 2
    return float(max(counts[:half].sum(), counts[half:].sum()) / segments)


def retrieval_at_scale(path: Path) -> dict:  # type: ignore[type-arg]
    """Retrieval per draft and strict tokens per step at the largest pool size `bench/pool_scale.py` measured (its
    JSON): the segment pool, the worker's capped global pool, both merged, and the uncapped global pool where it fit."""
    points = json.loads(path.read_text())["points"]
    largest = max(p["texts"] for p in points)
    out: dict = {"texts": largest, "source": str(path)}  # type: ignore[type-arg]
    for p in points:
        if "retrieval_ms_per_draft" not in p:  # measured only where it fits in memory
            out[f"{p['pools']} at {p['texts']} texts"] = {"fits": False, "trie_nodes_at_most": p.get("pool_nodes_at_most")}
        elif p["texts"] == largest or p["pools"] == "global-all":
            key = p["pools"] if p["texts"] == largest else f"{p['pools']} at {p['texts']} texts"
            out[key] = {"retrieval_ms_per_draft": p["retrieval_ms_per_draft"], "accepted": p["tokens_per_step"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--ratings", type=int, default=1_000_000)
    parser.add_argument("--segments", type=int, default=64, help="k-means k of the pool builders")
    parser.add_argument("--segments-for-pools", type=int, default=200, help="segment pools two workers split (built as tries)")
    parser.add_argument("--share-segments", type=int, default=1_000, help="segments whose split by partition is counted")
    parser.add_argument("--pool-cap", type=int, default=64)
    parser.add_argument("--knowledge", type=Path, default=Path("results/knowledge/ml-100k-short-ar.jsonl"))
    parser.add_argument("--members", default="1,2")
    parser.add_argument("--partitions", type=int, default=Settings().partitions, help="of the pool builders' topics (default: DARE_PARTITIONS, 4); "
                        "few partitions split power-law users unevenly between the members")
    parser.add_argument("--skip-workers", action="store_true", help="pool builders only")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--retrieval-json", type=Path, default=Path("bench/results/scale_pools.json"),
                        help="bench/pool_scale.py's figures, copied into the report")
    args = parser.parse_args()
    from dare.synth import synth

    data = Path(tempfile.mkdtemp(prefix="scale-")) / "synth"
    start = time.perf_counter()
    synth(data, args.users, args.items, args.ratings)
    catalogue = load_catalogue(data)
    with_ratings = len({r.user_id for r in catalogue.ratings})
    print(f"synthetic catalogue: {args.users:,} users ({with_ratings:,} with ratings), {args.items:,} items, {args.ratings:,} ratings "
          f"({time.perf_counter() - start:.0f}s)", flush=True)
    report: dict = {"catalogue": {"users": args.users, "users_with_ratings": with_ratings, "items": args.items, "ratings": args.ratings},
                    "segments": args.segments, "machine": os.uname().nodename, "builders": []}
    with ExitStack() as stack:
        servers, broker_pid = os.environ.get("DARE_BOOTSTRAP_SERVERS"), None
        if not servers:
            broker = stack.enter_context(EmbeddedBroker())
            servers, broker_pid = broker.bootstrap_servers, broker.process.pid  # type: ignore[union-attr]
        for members in (int(m) for m in args.members.split(",")):
            print(f"pool builders: {members}", flush=True)
            report["builders"].append(run_builders(servers, catalogue, members, args.segments, with_ratings, broker_pid,
                                                   args.partitions))
            print(f"  {report['builders'][-1]}", flush=True)
        if not args.skip_workers:
            print(f"two workers, {args.segments_for_pools} segment pools of {args.pool_cap} texts", flush=True)
            report["workers"] = worker_shares(servers, args.knowledge, args.segments_for_pools, args.pool_cap)
    runs = {r["members"]: r for r in report["builders"]}
    report["users_replayed"] = with_ratings
    if args.retrieval_json.is_file():
        report["retrieval"] = retrieval_at_scale(args.retrieval_json)
    report["worker_pool_share_by_partition"] = {str(args.segments_for_pools): partition_share(args.segments_for_pools),
                                                str(args.share_segments): partition_share(args.share_segments)}
    if 1 in runs and 2 in runs:
        report["pool_builders_speedup"] = runs[2]["ingest_events_per_s"] / runs[1]["ingest_events_per_s"]
    print("\n| pool builders | items encoded s | ratings/s after items | every user assigned s | peak RSS MB per member | inertia "
          "| member CPU µs per rating | CPU s while ingesting: members / broker / bench |")
    print("| ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |")
    for r in report["builders"]:
        cpu = r["cpu_s_while_ingesting"]
        print(f"| {r['members']} | {r['items_encoded_s']:.0f} | {r['ingest_events_per_s']:,.0f} | {r['all_assigned_s']:.0f} "
              f"| {', '.join(str(m) for m in r['peak_rss_mb'])} | {r['inertia']:.4f} | {r['member_cpu_us_per_rating']:.0f} "
              f"| {' + '.join(str(c) for c in cpu['members'])} / {cpu['broker']} / {cpu['bench']} |")
    if "pool_builders_speedup" in report:
        print(f"two pool builders: {report['pool_builders_speedup']:.2f}x one's ingest rate")
    if args.skip_workers:
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        return
    report["worker_pool_share"] = report["workers"]["worker_pool_share"]
    print("\n| worker | prompt partitions | segments held | texts | trie nodes | load s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in ("worker A", "worker B", "one worker"):
        w = report["workers"][name]
        print(f"| {name} | {w['partitions']} | {w['segments']} | {w['texts']:,} | {w['segment_nodes']:,} | {w['load_s']:.1f} |")
    print(f"largest share one of two workers holds: {report['worker_pool_share']:.2f} (trie nodes, {args.segments_for_pools} segments); "
          f"by the partitioner's split of {args.share_segments} segments: {report['worker_pool_share_by_partition'][str(args.share_segments)]:.3f}")
    w = report["workers"]
    print(f"per segment pool of {args.pool_cap} texts: {w['nodes_per_segment']:,.0f} trie nodes, loaded in {w['load_s_per_segment']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
