"""The pipeline as separate processes, for the app's end-to-end commands (`dare demo`,
`dare generate-all`): the embedded broker unless a cluster is named, a pool builder, workers,
the MovieLens event replay, and a downstream reader of the knowledge and dead-letter topics.

    with pipeline(settings, "demo") as run:      # SIGINT/SIGTERM unwind like Ctrl-C
        run.start_pool_builder(); users = run.replay_events(); run.start_workers(2)
        segments = run.wait_for_segments(users)   # ... produce prompts, read run.results
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dare.data import Catalogue, item_events, load_movielens, user_events
from infra.broker import EmbeddedBroker
from infra.kafka import ensure_topics, produce, wait_for_broker
from infra.process import child_env
from infra.reader import TopicReader
from infra.settings import Settings
from schemas import DeadLetter, KnowledgeRecord, PromptRequest, SchemaError, SegmentAssignment, Topics, decode


class PipelineError(RuntimeError):
    """The run cannot go on (a process it started died, or a phase timed out)."""


INTERRUPTED = threading.Event()


def interrupt(signum: int, _frame: object) -> None:
    INTERRUPTED.set()
    raise KeyboardInterrupt


@dataclass
class Processes:
    """Services started by this process, each logging to its own file; stopped together."""

    settings: Settings
    log_dir: Path
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, *args: str, threads: int | None = None, python: str | None = None) -> None:
        """`python`: another environment's interpreter (the vLLM worker's); this one's by default."""
        settings = self.settings.model_copy(update={"threads": threads}) if threads else self.settings
        command = [python or sys.executable, "-P", "-m", "dare.cli", "--log-format", "json", *args,  # -P: not from the cwd
                   "--bootstrap-servers", str(settings.bootstrap_servers), "--topic-prefix", settings.topic_prefix]
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as out:
            self.children[name] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                   env=child_env(settings))
        print(f"started {name} (pid {self.children[name].pid}), log {log_path}", flush=True)

    def check(self) -> None:
        """Raise if the run was interrupted, or if a service died."""
        if INTERRUPTED.is_set():  # the KeyboardInterrupt may have been swallowed inside a client library
            raise KeyboardInterrupt
        for name, process in self.children.items():
            if process.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
                raise PipelineError(f"{name} exited with code {process.returncode}; last log lines:\n  " + "\n  ".join(tail))

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


def prepare_model(settings: Settings, threads: int) -> None:
    """Convert the model and measure the cost curve once here, so the workers start from the cache."""
    import torch

    from workers.engine import load_model, load_or_measure

    print("preparing the model (the first run converts the packaged GGUF and measures this machine's "
          "verify-cost curve, ~45 s once)", flush=True)
    lm = load_model(settings.model, settings.device, settings.dtype, settings.cache_dir, threads, settings.compile, settings.weights)
    load_or_measure(lm, settings.cache_dir)
    del lm
    torch.set_num_threads(max(1, os.cpu_count() or 1))


@dataclass
class Pipeline:
    settings: Settings
    processes: Processes
    log_dir: Path
    timeout_s: float
    topics: Topics = field(init=False)
    results: Results = field(default_factory=Results)
    progress: Progress = field(default_factory=Progress)
    downstream: TopicReader | None = None  # knowledge and dead letters, from where they ended at start
    segments: dict[tuple[str, str], str] = field(default_factory=dict)  # (entity kind, id) → segment, as assigned

    def __post_init__(self) -> None:
        self.topics = Topics(self.settings.topic_prefix)

    def start_pool_builder(self, *args: str) -> None:
        self.processes.start("pool-builder", "pool-builder", "--state-dir", str(self.log_dir / "pool-builder-state"), *args)

    def start_workers(self, count: int, threads: int | None, *args: str, python: str | None = None) -> None:
        for n in range(1, count + 1):
            self.processes.start(f"worker-{n}", "worker", *args, threads=threads, python=python)

    def replay_events(self, ratings: int | None = None, catalogue: Catalogue | None = None) -> set[str]:
        """Item then user events of `catalogue` (default MovieLens-100k) into Kafka; returns the users
        whose ratings were replayed."""
        ml = catalogue or load_movielens()
        n_items = produce(self.settings, self.topics.item_events, item_events(ml))
        events = list(user_events(ml, ratings))
        n_ratings = produce(self.settings, self.topics.user_events, events)
        print(f"replayed {ml.name}: {n_items} item events, {n_ratings} rating events", flush=True)
        self.processes.check()
        return {e.user_id for e in events}

    def wait_for_segments(self, users: set[str]) -> dict[str, str]:
        """Follow the assignments topic until every replayed user has a segment; every assignment read (items'
        too) stays in `segments`, for prompts to be keyed by (`with_segments`)."""
        segment_of: dict[str, str] = {}
        deadline = time.monotonic() + self.timeout_s
        with TopicReader(self.settings, [self.topics.assignments], role="pipeline") as reader:
            try:
                while not users <= segment_of.keys():
                    self.processes.check()
                    if time.monotonic() > deadline:
                        raise PipelineError(f"the pool builder assigned {len(segment_of)} of {len(users)} users "
                                            f"in {self.timeout_s:.0f}s")
                    for record in reader.poll():
                        a = decode(SegmentAssignment, record.value)
                        self.segments[(a.entity_kind, a.entity_id)] = a.segment
                        if a.entity_kind == "user":
                            segment_of[a.entity_id] = a.segment
                    self.progress.show(f"pool builder: {len(users & segment_of.keys())}/{len(users)} users in segments")
            finally:
                self.progress.done()
        return {u: segment_of[u] for u in users}

    def with_segments(self, requests: list[PromptRequest]) -> list[PromptRequest]:
        """Each prompt with its entity's segment as last assigned, so it is keyed and partitioned with its pool."""
        return [r if r.segment or (r.entity_kind, r.entity_id) not in self.segments
                else r.model_copy(update={"segment": self.segments[(r.entity_kind, r.entity_id)]}) for r in requests]

    def read_downstream(self, timeout_ms: int = 200) -> None:
        """What arrived on the knowledge and dead-letter topics since the last call, into `results`."""
        assert self.downstream is not None
        self.results.add(self.topics, self.downstream.poll(timeout_ms=timeout_ms))


@contextmanager
def pipeline(settings: Settings, name: str, timeout_s: float, broker_port: int | None = None) -> Iterator[Pipeline]:
    """A run of the pipeline: the embedded broker unless `settings` name one, every topic, a log
    directory, and every process started through it stopped on exit. SIGINT and SIGTERM unwind as
    KeyboardInterrupt."""
    run_id = f"{name}{int(time.time())}"
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    INTERRUPTED.clear()
    try:
        with ExitStack() as stack:
            embedded = not settings.bootstrap_servers
            if embedded:
                broker = stack.enter_context(EmbeddedBroker(port=broker_port))
                settings = settings.model_copy(update={"bootstrap_servers": broker.bootstrap_servers})
                print(f"embedded broker at {broker.bootstrap_servers} (removed when the {name} ends)", flush=True)
            wait_for_broker(settings, timeout_s=30 if embedded else None)
            ensure_topics(settings, Topics(settings.topic_prefix).all())
            log_dir = settings.cache_dir / name / run_id
            log_dir.mkdir(parents=True, exist_ok=True)
            processes = Processes(settings, log_dir)
            stack.callback(processes.stop)
            run = Pipeline(settings, processes, log_dir, timeout_s)
            run.downstream = stack.enter_context(
                TopicReader(settings, [run.topics.knowledge, run.topics.dead_letter], from_beginning=False, role=name,
                            fetch_wait_ms=settings.fetch_wait_ms))
            yield run
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
