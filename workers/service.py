"""The generator worker: prompts in, knowledge records out, at least once.

One loop, for batch 1 and for continuous batching alike: poll as many prompts as the decoder has
room for, add them, take a decoding step, publish the knowledge of every prompt that finished
(waiting for the broker's acknowledgement), then commit each partition up to its oldest prompt
still in flight (`infra.delivery`). A crash before the commit means a prompt is decoded again (a
countable duplicate), never lost. Bad input goes to the dead-letter topic with the reason and
the original bytes.

Mode `ar` is the engine's own greedy decoding (no drafts), at batch 1 and in batches alike.

Two engines behind the same loop and the same decoder interface (`workers.engine.open_engine`):
`transformers` (this project's batch decoder, the default) and `vllm` (DARE inside vLLM: vLLM's
continuous batching, DARE's drafts and acceptance; the vllm extra).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import Counter, Gauge, Histogram

from infra.delivery import Delivery, OffsetTracker, Undelivered, commit, consumer_lag, dead_letter
from infra.health import HEALTH
from infra.kafka import ensure_topics, group_id, make_consumer
from infra.settings import Settings
from schemas import DecodeStats, KnowledgeRecord, Mode, PromptRequest, SchemaError, Topics, decode, encode
from workers.engine import Decoder, DraftConfig, LoadedModel, PoolTexts, RequestStats, Strategy, chat_input_ids, open_engine
from workers.pools import LivePools, PoolFollower

log = structlog.get_logger("worker")

GROUP = "workers"  # consumer group: the topic prefix + this ("dare.workers" by default)

PROMPTS = Counter("dare_worker_prompts_total", "Prompts answered", ["mode"])
TOKENS = Counter("dare_worker_tokens_total", "Tokens generated", ["mode"])
DEAD = Counter("dare_worker_dead_letters_total", "Prompts sent to the dead-letter topic", ["error_type"])
ACCEPTED = Gauge("dare_worker_mean_accepted", "Tokens per forward pass of the last prompt")
TOKENS_PER_S = Gauge("dare_worker_tokens_per_second", "Decode speed of the last prompt")
SPEEDUP = Gauge("dare_worker_speedup_estimate",
                "Last prompt's speedup over greedy from the cost curve: tokens per step x cost(1) / mean cost of its verify steps")
LAG = Gauge("dare_worker_consumer_lag", "Prompts waiting in this worker's partitions (high watermark - position)")
READY = Gauge("dare_worker_ready", "1 once the worker has its pools and has joined the group")
STEPS = Counter("dare_worker_steps_total", "Decoding steps (one forward over every row the decoder holds)")
STEP_ROWS = Counter("dare_worker_step_rows_total", "Rows summed over decoding steps (/ steps = mean batch occupancy)")
# Distributions, per prompt, by mode (what the load bench measures, for a fleet):
SECONDS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)
LATENCY = Histogram("dare_worker_latency_seconds", "Prompt produced (its created_at) to its knowledge record acknowledged by the broker",
                    ["mode"], buckets=SECONDS)
QUEUE = Histogram("dare_worker_queue_seconds", "Prompt produced to its decode starting: waiting in the topic and for a row",
                  ["mode"], buckets=SECONDS)
DECODE = Histogram("dare_worker_decode_seconds", "A prompt's decode, joining the decoder to its last token (its prefill included)",
                   ["mode"], buckets=SECONDS)
PREFILL = Histogram("dare_worker_prefill_seconds", "A prompt's own prefill", ["mode"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8))
ENTITY_TOKENS = Histogram("dare_worker_tokens_per_entity", "Tokens of a knowledge text", ["mode", "entity_kind"],
                          buckets=(8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 1024))
STEP_TOKENS = Histogram("dare_worker_tokens_per_step", "A prompt's tokens per decoding step (1: no draft accepted)", ["mode"],
                        buckets=(1, 1.1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12))
DRAFTED = Counter("dare_worker_draft_tokens_total", "Draft tokens verified, by acceptance rule and source "
                  "(segment pool, global pool, own prompt and output; unattributed: the vLLM backend)", ["rule", "source"])
DRAFTS_ACCEPTED = Counter("dare_worker_draft_tokens_accepted_total", "Draft tokens accepted, by acceptance rule and source",
                          ["rule", "source"])


def observe(knowledge: KnowledgeRecord, stats: RequestStats, produced_at: float) -> None:
    """A published prompt into the distributions and the draft counters."""
    mode, s = knowledge.mode, knowledge.stats
    latency = max(0.0, time.time() - produced_at)  # wall clocks of two machines: never below 0
    LATENCY.labels(mode).observe(latency)
    QUEUE.labels(mode).observe(max(0.0, latency - s.wall_s))
    DECODE.labels(mode).observe(s.wall_s)
    PREFILL.labels(mode).observe(s.prefill_s)
    ENTITY_TOKENS.labels(mode, knowledge.entity_kind).observe(knowledge.token_count)
    STEP_TOKENS.labels(mode).observe(s.mean_accepted)
    if mode == "ar":
        return
    if stats.drafted_by:
        for source, n in stats.drafted_by.items():
            DRAFTED.labels(mode, source).inc(n)
            DRAFTS_ACCEPTED.labels(mode, source).inc(stats.accepted_by.get(source, 0))
    else:  # a backend that does not say where its drafts came from
        DRAFTED.labels(mode, "unattributed").inc(sum(stats.drafted))
        DRAFTS_ACCEPTED.labels(mode, "unattributed").inc(sum(stats.accepted) - stats.steps)


class PromptRejected(ValueError):
    """A well-formed prompt that this worker cannot serve (e.g. longer than the model's context)."""

    def __init__(self, reason: str, error_type: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error_type = error_type


@dataclass
class WorkerStats:
    prompts: int = 0
    tokens: int = 0
    dead_lettered: int = 0
    decode_s: float = 0.0
    started: float = field(default_factory=time.time)


@dataclass
class InFlight:
    """A prompt the decoder holds."""

    record: ConsumerRecord
    request: PromptRequest
    mode: Mode
    segment: str | None
    pool_version: int | None = None  # of the segment's pool when the prompt joined the decoder


class FollowPools(ConsumerRebalanceListener):
    """On every rebalance, the pools of the prompt partitions this worker now owns, loaded before it polls them."""

    def __init__(self, follower: PoolFollower, loaded: Callable[[], None] = lambda: None) -> None:
        self.follower = follower
        self.loaded = loaded  # called once the pools are in

    def on_partitions_revoked(self, revoked: object) -> None:
        pass  # the next assignment says what to keep

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        consumer = self.follower.reader.consumer
        prompts = {tp.topic for tp in assigned}
        count = len(consumer.partitions_for_topic(prompts.pop()) or ()) if prompts else self.follower.partitions
        self.follower.follow({tp.partition for tp in assigned}, count)
        self.loaded()


class Worker:
    def __init__(self, settings: Settings, lm: LoadedModel, mode: Mode = "ar", worker_id: str | None = None,
                 batch: int = 1, backend: str = "transformers", eager: bool = False, learn: bool = True,
                 vllm_method: str = "dare") -> None:
        """`learn`: what was decoded earlier speeds up later prompts (a generated text joins this worker's
        pools at once, as in the paper's code; vLLM caches prefixes, its suffix drafter keeps answers).
        Benches that repeat prompts turn it off, or a repeated prompt would draft its own earlier answer.
        `vllm_method` (backend vllm): `dare`, or vLLM's own `greedy`/`ngram`/`suffix` (every prompt then
        decodes greedily, mode `ar`, whatever it asks for: the peers a user would run instead)."""
        self.settings = settings
        self.learn = learn
        self.batch = batch
        self.lm = lm
        self.mode = mode
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.topics = Topics(settings.topic_prefix)
        self.stats = WorkerStats()
        model_dir = str(Path(settings.model).expanduser()) if settings.model else None
        self.engine = open_engine(backend, lm, settings.cache_dir, rows=batch, model_dir=model_dir, vllm_method=vllm_method,
                                  eager=eager, learn=learn, strategy=Strategy(max_top1=settings.relaxed_max_top1,
                                                                              prefill_per_step=settings.prefill_per_step))
        self._alone: Decoder | None = None  # `answer`'s decoder
        self.pools = LivePools(PoolTexts(lm.tokenizer, DraftConfig()))
        self.follower: PoolFollower | None = None
        self.ready = threading.Event()  # set once pools are loaded and partitions assigned
        self.in_flight: dict[tuple[str, int, int], InFlight] = {}  # by (topic, partition, offset)

    def prepare(self, request: PromptRequest) -> tuple[list[int], int, Mode, str | None]:
        """Input ids, token limit, mode and segment of a request; rejects what cannot be served."""
        max_new = request.max_new_tokens or self.settings.max_new_tokens
        input_ids = chat_input_ids(self.lm.tokenizer, request.prompt)
        if len(input_ids) + max_new > self.engine.context_limit:
            raise PromptRejected(
                f"prompt of {len(input_ids)} tokens + {max_new} new tokens exceeds the model's context of {self.engine.context_limit}",
                "too_long",
            )
        if self.follower is not None:
            self.follower.poll()  # pools as fresh as the topic
        segment = self.pools.segment_of(request.entity_kind, request.entity_id, request.segment)
        return input_ids, max_new, self.engine.mode_for(request.mode or self.mode), segment

    def answer(self, request: PromptRequest) -> KnowledgeRecord:
        """Decode one prompt into its knowledge record, outside Kafka (benches, tools)."""
        input_ids, max_new, mode, segment = self.prepare(request)
        if self._alone is None:  # kept: the transformers decoder keeps the prompt head's keys for the next
            self._alone = self.engine.decoder(1)
        self._alone.add(None, input_ids, max_new, mode, self.pools.sources(segment))
        finished = []
        while not finished:
            finished = self._alone.step()
        return self.record(request, segment, mode, finished[0].token_ids, finished[0].stats, self.pools.version(segment))

    def record(self, request: PromptRequest, segment: str | None, mode: Mode, token_ids: list[int], s: RequestStats,
               pool_version: int | None = None) -> KnowledgeRecord:
        text = self.lm.tokenizer.decode(token_ids, skip_special_tokens=True)  # type: ignore[attr-defined]
        if self.learn and text.strip():  # the paper's code: a generated text drafts for the next request at once
            self.pools.add_text(segment, f"{request.entity_kind}-{request.entity_id}", text)
        cost = self.engine.cost
        verify_s = sum(cost.cost(1 + n) for n in s.drafted)
        SPEEDUP.set(sum(s.accepted) * cost.cost(1) / verify_s if verify_s else 1.0)  # from the cost curve: load-independent
        return KnowledgeRecord(
            request_id=request.request_id,
            entity_kind=request.entity_kind,
            entity_id=request.entity_id,
            segment=segment,
            text=text,
            token_count=len(token_ids),
            mode=mode,
            model=self.lm.model_id,
            stats=DecodeStats(steps=s.steps, new_tokens=s.new_tokens, mean_accepted=s.mean_accepted, wall_s=s.wall_s,
                              retrieval_s=s.retrieval_s, forward_s=s.forward_s + s.prefill_s, prefill_s=s.prefill_s,
                              stalled_s=s.stalled_s),
            worker=self.worker_id,
            prompt_version=request.prompt_version,
            pool_version=pool_version,
        )

    def decoding(self) -> set[str]:
        """Request ids of the prompts in flight."""
        return {f.request.request_id for f in list(self.in_flight.values())}

    def run(self, stop: threading.Event, max_prompts: int | None = None, idle_timeout_s: float | None = None) -> WorkerStats:
        """Consume until `stop` is set, `max_prompts` were answered, or nothing arrived for `idle_timeout_s`.
        If the broker goes away, delivery is retried with backoff until it is back (or, once stopping,
        for a grace period; the prompt then stays uncommitted and is answered again later)."""
        ensure_topics(self.settings, [self.topics.prompts, self.topics.knowledge, self.topics.dead_letter,
                                      self.topics.pools, self.topics.assignments])
        self.follower = PoolFollower(self.settings, self.pools, partitioned=True)
        applied = self.follower.poll(timeout_ms=500)  # the assignments; pools come with the prompt partitions
        log.info("assignments loaded", updates=applied, assignments=len(self.pools.assignments))
        self.delivery = Delivery(self.settings, "worker", stop)
        # At most as many prompts per poll as the decoder has room for keeps the time between polls
        # to one decode (batch 1) or one batch step: no rebalance storms.
        consumer = make_consumer(self.settings, "worker", group_id(self.settings, GROUP), [self.topics.prompts],
                                 listener=FollowPools(self.follower, self._pools_loaded), max_poll_records=1,
                                 fetch_max_wait_ms=self.settings.fetch_wait_ms)
        self._last_message = time.monotonic()
        HEALTH.set_ready(False, "joining the consumer group; its partitions' pools not loaded yet")
        log.info("worker started", worker=self.worker_id, mode=self.mode, batch=self.batch, topic=self.topics.prompts)
        try:
            self._loop(consumer, stop, max_prompts, idle_timeout_s)
        except Undelivered:
            pass  # logged; the uncommitted prompts are answered again after a restart
        finally:
            self.ready.clear()
            READY.set(0)
            HEALTH.set_ready(False, "stopped")
            self.delivery.close()
            consumer.close(autocommit=False)
            self.follower.close()
            log.info("worker stopped", worker=self.worker_id, prompts=self.stats.prompts, dead_lettered=self.stats.dead_lettered)
        return self.stats

    def _pools_loaded(self) -> None:
        """vLLM's suffix drafter caches the texts DARE's pools hold (other engines take pools per request)."""
        self.engine.learn_from([t for pool in self.pools.replica.pools.values() for t in pool.values()])

    def _loop(self, consumer, stop: threading.Event, max_prompts: int | None, idle_timeout_s: float | None) -> None:  # type: ignore[no-untyped-def]
        """Fetched prompts join the decoder while others decode; a partition's offset is committed up
        to its oldest prompt still in flight, once the records before it were acknowledged."""
        decoder = self.engine.decoder(self.batch)
        offsets = OffsetTracker()
        while not stop.is_set() and not (not len(decoder) and self._finished(max_prompts, idle_timeout_s)):
            HEALTH.beat()
            room = self.batch - len(decoder)
            if max_prompts is not None:
                room = min(room, max_prompts - self.stats.prompts - self.stats.dead_lettered - len(decoder))
            for record in self._poll(consumer, 0 if len(decoder) else 500, room) if room > 0 else []:
                offsets.polled(record)
                try:
                    request = decode(PromptRequest, record.value)
                    input_ids, max_new, mode, segment = self.prepare(request)
                except (SchemaError, PromptRejected) as exc:
                    self._dead_letter(record, exc)
                    offsets.done(record)
                    continue
                key = (record.topic, record.partition, record.offset)
                decoder.add(key, input_ids, max_new, mode, self.pools.sources(segment))
                self.in_flight[key] = InFlight(record, request, mode, segment, self.pools.version(segment))
            if len(decoder):
                STEPS.inc()
                STEP_ROWS.inc(len(decoder))
            for finished in decoder.step():
                f = self.in_flight.pop(finished.key)  # type: ignore[arg-type]
                with structlog.contextvars.bound_contextvars(request_id=f.request.request_id, partition=f.record.partition,
                                                             offset=f.record.offset):
                    knowledge = self.record(f.request, f.segment, f.mode, finished.token_ids, finished.stats, f.pool_version)
                    self._publish(knowledge)
                    observe(knowledge, finished.stats, f.request.created_at)
                offsets.done(f.record)
            commit(consumer, offsets.committable())
            LAG.set(consumer_lag(consumer))

    def _poll(self, consumer, timeout_ms: int, max_records: int) -> list[ConsumerRecord]:  # type: ignore[no-untyped-def]
        batch = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        if not consumer.assignment():  # joining or rebalancing: not idle
            self._last_message = time.monotonic()
        elif not self.ready.is_set():
            self.ready.set()
            READY.set(1)
            HEALTH.set_ready(True)
            log.info("worker ready", partitions=len(consumer.assignment()))
        records = [r for rs in batch.values() for r in rs]
        if records:
            self._last_message = time.monotonic()
        return records

    def _finished(self, max_prompts: int | None, idle_timeout_s: float | None) -> bool:
        if max_prompts is not None and self.stats.prompts + self.stats.dead_lettered >= max_prompts:
            return True
        return idle_timeout_s is not None and time.monotonic() - self._last_message > idle_timeout_s

    def _publish(self, knowledge: KnowledgeRecord) -> None:
        self.delivery.send(self.topics.knowledge, knowledge.entity_id.encode(), encode(knowledge))
        self.stats.prompts += 1
        self.stats.tokens += knowledge.token_count
        self.stats.decode_s += knowledge.stats.wall_s
        PROMPTS.labels(knowledge.mode).inc()
        TOKENS.labels(knowledge.mode).inc(knowledge.token_count)
        ACCEPTED.set(knowledge.stats.mean_accepted)
        TOKENS_PER_S.set(knowledge.token_count / knowledge.stats.wall_s if knowledge.stats.wall_s else 0.0)
        log.info("knowledge published", tokens=knowledge.token_count, wall_s=round(knowledge.stats.wall_s, 2))

    def _dead_letter(self, record: ConsumerRecord, exc: SchemaError | PromptRejected) -> None:
        letter = dead_letter(record, exc.reason, exc.error_type, f"worker:{self.worker_id}")
        self.delivery.send(self.topics.dead_letter, record.key, encode(letter))
        self.stats.dead_lettered += 1
        DEAD.labels(exc.error_type).inc()
        log.warning("prompt dead-lettered", reason=exc.reason, error_type=exc.error_type,
                    topic=record.topic, partition=record.partition, offset=record.offset)
