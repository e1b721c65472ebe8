"""`dare demo`: the whole pipeline, as separate processes, on the embedded broker unless a
cluster is named.

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
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from dare.data import item_events, load_movielens, prompt_request, user_events
from infra.broker import EmbeddedBroker
from infra.kafka import ensure_topics, produce, wait_for_broker
from infra.process import child_env
from infra.reader import TopicReader
from infra.settings import Settings
from schemas import DeadLetter, KnowledgeRecord, Mode, PoolReplica, PoolUpdate, SchemaError, SegmentAssignment, Topics, decode

SEED_MODE: Mode = "ar"
DARE_MODE: Mode = "relaxed"


class DemoError(RuntimeError):
    """The demo cannot go on (a process it started died, or a phase timed out)."""


# ---------------------------------------------------------------------------- child processes


INTERRUPTED = threading.Event()


def interrupt(signum: int, _frame: object) -> None:
    INTERRUPTED.set()
    raise KeyboardInterrupt


@dataclass
class Processes:
    """Services started by the demo, each logging to its own file; stopped together."""

    settings: Settings
    log_dir: Path
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str, threads: int | None = None) -> None:
        settings = self.settings.model_copy(update={"threads": threads}) if threads else self.settings
        command = [sys.executable, "-P", "-m", "dare.cli", "--log-format", "json", *args,  # -P: not from the cwd
                   "--bootstrap-servers", str(settings.bootstrap_servers), "--topic-prefix", settings.topic_prefix]
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as out:
            self.children[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                   env=child_env(settings))
        print(f"started {name} (pid {self.children[name].pid}), log {log_path}", flush=True)

    def check(self) -> None:
        """Raise if the demo was interrupted, or if a service died."""
        if INTERRUPTED.is_set():  # the KeyboardInterrupt may have been swallowed inside a client library
            raise KeyboardInterrupt
        for name, process in self.children.items():
            if process.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
                raise DemoError(f"{name} exited with code {process.returncode}; last log lines:\n  " + "\n  ".join(tail))

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM all (each finishes what it holds and commits), then SIGKILL what lingers."""
        for process in self.children.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for name, process in self.children.items():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop within {timeout_s:.0f}s: killed", file=sys.stderr, flush=True)
                process.kill()
                process.wait()
        self.children.clear()


# ---------------------------------------------------------------------------- reading topics


@dataclass
class Results:
    """What the downstream consumer has seen so far."""

    knowledge: list[KnowledgeRecord] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    unreadable: int = 0

    def add(self, topics: Topics, records: list) -> None:  # type: ignore[type-arg]
        for record in records:
            try:
                if record.topic == topics.knowledge:
                    self.knowledge.append(decode(KnowledgeRecord, record.value))
                else:
                    self.dead_letters.append(decode(DeadLetter, record.value))
            except SchemaError:
                self.unreadable += 1

    def answered(self, request_ids: set[str]) -> set[str]:
        return {r.request_id for r in self.knowledge} & request_ids


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


class Progress:
    """One status line: rewritten in place on a terminal, printed every few seconds otherwise."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.tty = sys.stdout.isatty()
        self.every_s = every_s
        self.last_line = ""
        self.printed = ""
        self.last_print = 0.0

    def show(self, line: str) -> None:
        now = time.monotonic()
        if self.tty:
            sys.stdout.write("\r\033[K" + line)
            sys.stdout.flush()
        elif line != self.printed and now - self.last_print >= self.every_s:
            print(line, flush=True)
            self.printed, self.last_print = line, now
        self.last_line = line

    def done(self) -> None:
        if self.tty and self.last_line:
            sys.stdout.write("\n")
        elif self.last_line and self.last_line != self.printed:
            print(self.last_line, flush=True)
        self.last_line = self.printed = ""


# ---------------------------------------------------------------------------- the phases


@dataclass
class Demo:
    settings: Settings
    limit: int
    ratings: int | None
    timeout_s: float
    topics: Topics = field(init=False)
    results: Results = field(default_factory=Results)
    progress: Progress = field(default_factory=Progress)

    def __post_init__(self) -> None:
        self.topics = Topics(self.settings.topic_prefix)

    def replay_events(self) -> set[str]:
        """Item then user events into Kafka; returns the users whose ratings were replayed."""
        ml = load_movielens()
        n_items = produce(self.settings, self.topics.item_events, item_events(ml))
        events = list(user_events(ml, self.ratings))
        n_ratings = produce(self.settings, self.topics.user_events, events)
        print(f"replayed MovieLens-100k: {n_items} item events, {n_ratings} rating events", flush=True)
        return {e.user_id for e in events}

    def wait_for_segments(self, users: set[str], processes: Processes) -> dict[str, str]:
        """Follow the assignments topic until every replayed user has a segment."""
        tail = TopicReader(self.settings, [self.topics.assignments], role="demo")
        segment_of: dict[str, str] = {}
        deadline = time.monotonic() + self.timeout_s
        try:
            while not users <= segment_of.keys():
                processes.check()
                if time.monotonic() > deadline:
                    raise DemoError(f"the pool builder assigned {len(segment_of)} of {len(users)} users in {self.timeout_s:.0f}s")
                for record in tail.poll():
                    a = decode(SegmentAssignment, record.value)
                    if a.entity_kind == "user":
                        segment_of[a.entity_id] = a.segment
                self.progress.show(f"pool builder: {len(users & segment_of.keys())}/{len(users)} users in segments")
        finally:
            tail.close()
            self.progress.done()
        return {u: segment_of[u] for u in users}

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
            raise DemoError(f"--limit {self.limit}: only {len(pairs)} seed/target user pairs share a segment")
        return pairs

    def produce_prompts(self, users: list[str], mode: str, run_id: str) -> set[str]:
        ml = load_movielens()
        requests = [prompt_request(ml, "user", u, request_id=f"{run_id}-{mode}-user-{u}", mode=mode) for u in users]
        produce(self.settings, self.topics.prompts, requests)
        return {r.request_id for r in requests}

    def wait_for_answers(self, tail: TopicReader, request_ids: set[str], all_ids: set[str], phase: str, processes: Processes) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            self.results.add(self.topics, tail.poll())
            mine = [r for r in self.results.knowledge if r.request_id in all_ids]
            done = len(self.results.answered(request_ids))
            modes = mode_figures(mine)
            current = modes.get(DARE_MODE if phase == DARE_MODE else SEED_MODE, {})
            line = (f"{phase}: {done}/{len(request_ids)} prompts · {current.get('tokens_per_s', 0.0):.1f} tokens/s "
                    f"· mean accepted {current.get('mean_accepted', 0.0):.2f}")
            if DARE_MODE in modes:
                line += f" · speedup {speedup(modes):.2f}x"
            self.progress.show(line + f" · dead letters {len(self.results.dead_letters)}")
            if done == len(request_ids):
                self.progress.done()
                return
            processes.check()
            if time.monotonic() > deadline:
                self.progress.done()
                raise DemoError(f"{phase}: {done} of {len(request_ids)} prompts answered within {self.timeout_s:.0f}s")

    def wait_for_pools(self, texts: set[str], processes: Processes) -> None:
        """Until the pool builder has published every seed text (workers read the same topic)."""
        tail = TopicReader(self.settings, [self.topics.pools], role="demo")
        deadline = time.monotonic() + self.timeout_s
        replica, published = PoolReplica(), set()
        try:
            while not texts <= published:
                processes.check()
                if time.monotonic() > deadline:
                    raise DemoError(f"{len(texts - published)} seed texts did not reach a published pool in {self.timeout_s:.0f}s")
                for record in tail.poll():
                    replica.apply(decode(PoolUpdate, record.value))
                published = {text_id for pool in replica.pools.values() for text_id in pool}
        finally:
            tail.close()
        print(f"pools: the {len(texts)} seed texts are in their segments' pools", flush=True)


def prepare_model(settings: Settings, threads: int) -> None:
    """Convert the model and measure the cost curve once here, so the workers start from the cache."""
    import torch

    from workers.engine.budget import load_or_measure
    from workers.engine.model import load_model

    lm = load_model(settings.model, settings.device, settings.dtype, settings.cache_dir, threads)
    load_or_measure(lm.model, lm.model_id, lm.device, settings.cache_dir)
    del lm
    torch.set_num_threads(max(1, os.cpu_count() or 1))


def run_demo(settings: Settings, limit: int = 3, workers: int = 1, ratings: int | None = None,
             json_path: Path | None = None, records_path: Path | None = None, timeout_s: float = 600.0,
             broker_port: int | None = None) -> int:
    start = time.perf_counter()
    run_id = f"demo{int(time.time())}"
    threads = settings.threads or max(1, (os.cpu_count() or 1) // workers)
    embedded = not settings.bootstrap_servers
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}  # both unwind like Ctrl-C
    INTERRUPTED.clear()
    try:
        with ExitStack() as stack:
            if embedded:
                broker = stack.enter_context(EmbeddedBroker(port=broker_port))
                settings = settings.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})
                print(f"embedded broker at {broker.bootstrap_servers} (removed when the demo ends)", flush=True)
            wait_for_broker(settings, timeout_s=30 if embedded else None)
            demo = Demo(settings, limit, ratings, timeout_s)
            topics = demo.topics
            ensure_topics(settings, topics.all())
            log_dir = settings.cache_dir / "demo" / run_id
            log_dir.mkdir(parents=True, exist_ok=True)
            processes = Processes(settings, log_dir)
            stack.callback(processes.stop)
            tail = TopicReader(settings, [topics.knowledge, topics.dead_letter], from_beginning=False, role="demo")
            stack.callback(tail.close)

            print("preparing the model (the first run converts the packaged GGUF and measures this machine's "
                  "verify-cost curve, ~45 s once)", flush=True)
            prepare_model(settings, threads)
            processes.start("pool-builder", "pool-builder", "--segments", "4", "--refit-every", "5",
                            "--state-dir", str(log_dir / "pool-builder-state"))
            users = demo.replay_events()
            processes.check()
            for n in range(1, workers + 1):
                processes.start(f"worker-{n}", "worker", threads=threads)
            pairs = demo.pick_users(demo.wait_for_segments(users, processes))

            seeds = demo.produce_prompts([s for s, _ in pairs], SEED_MODE, run_id)
            targets: set[str] = set()
            print(f"phase 1: {len(seeds)} seed prompts ({SEED_MODE}) to {topics.prompts}", flush=True)
            demo.wait_for_answers(tail, seeds, seeds, SEED_MODE, processes)
            demo.wait_for_pools({f"user-{s}" for s, _ in pairs}, processes)
            targets = demo.produce_prompts([t for _, t in pairs], DARE_MODE, run_id)
            print(f"phase 2: {len(targets)} prompts ({DARE_MODE}) for users in the seeds' segments", flush=True)
            demo.wait_for_answers(tail, targets, seeds | targets, DARE_MODE, processes)
            demo.results.add(topics, tail.poll(timeout_ms=1000))  # duplicates that arrive late
            processes.check()
    except KeyboardInterrupt:
        print("\ninterrupted: stopped the processes the demo started" + (" and the broker" if embedded else ""),
              file=sys.stderr, flush=True)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    request_ids = seeds | targets
    mine = [r for r in demo.results.knowledge if r.request_id in request_ids]
    modes = mode_figures(mine)
    summary = {
        "prompts": len(request_ids),
        "knowledge_records": len(mine),
        "lost": len(request_ids - demo.results.answered(request_ids)),
        "duplicates": len(mine) - len({r.request_id for r in mine}),
        "dead_lettered": len(demo.results.dead_letters),
        "modes": modes,
        "speedup_vs_ar": speedup(modes),
        "wall_s": time.perf_counter() - start,
        "workers": workers,
        "bootstrap_servers": settings.bootstrap_servers,
        "logs": str(log_dir),
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
