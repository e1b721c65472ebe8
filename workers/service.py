"""The generator worker: prompts in, knowledge records out, at least once.

One loop: poll a bounded batch of prompts, decode each, produce its knowledge record, wait
for the broker's acknowledgement, then commit the offsets of what was answered. A crash
before the commit means the prompt is decoded again (a countable duplicate), never lost.
Bad input goes to the dead-letter topic with the reason and the original bytes.
"""

from __future__ import annotations

import base64
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import structlog
from kafka import OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError
from prometheus_client import Counter, Gauge

from dare.model import LoadedModel, chat_input_ids
from dare.settings import Settings
from infra.kafka import close_producer, ensure_topics, group_id, make_consumer, make_producer
from schemas import DeadLetter, DecodeStats, KnowledgeRecord, PromptRequest, SchemaError, Topics, decode, encode
from workers.engine.batch import BatchDecoder
from workers.engine.budget import load_or_measure
from workers.engine.decode import Dare
from workers.engine.decode import DecodeStats as EngineStats
from workers.greedy import greedy_generate
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


DELIVERY_ATTEMPT_S = 10.0  # one produce attempt: send + broker acknowledgement
STOP_GRACE_S = 10.0  # once stopping, how long an undeliverable record is retried before giving up


class Undelivered(RuntimeError):
    """A record could not be delivered before shutdown: its prompt stays uncommitted."""


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


def dead_letter(record: ConsumerRecord, reason: str, error_type: str, service: str) -> DeadLetter:
    return DeadLetter(
        reason=reason[:4000],
        error_type=error_type,
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key_b64=base64.b64encode(record.key).decode() if record.key is not None else None,
        value_b64=base64.b64encode(record.value or b"").decode(),
        service=service,
    )


def consumer_lag(consumer) -> int:  # type: ignore[no-untyped-def]
    """Records behind in the assigned partitions, from the high watermarks of recent fetches (no extra request)."""
    lag = 0
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is not None:
            lag += max(0, high - consumer.position(tp))
    return lag


def commit(consumer, offsets: dict[TopicPartition, int]) -> None:  # type: ignore[no-untyped-def]
    """Commit `offsets` (the next offset to read, per partition); a revoked partition's commit fails
    and the new owner answers those prompts again (countable duplicates, never a loss)."""
    if not offsets:
        return
    try:
        consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()})
    except (CommitFailedError, KafkaError) as exc:
        log.warning("commit failed; prompts may be answered twice", error=repr(exc))


class OffsetTracker:
    """Per partition: offsets fetched and not yet answered; what may be committed."""

    def __init__(self) -> None:
        self.open: dict[TopicPartition, set[int]] = {}
        self.next: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}

    def polled(self, record: ConsumerRecord) -> None:
        tp = TopicPartition(record.topic, record.partition)
        self.open.setdefault(tp, set()).add(record.offset)
        self.next[tp] = max(self.next.get(tp, 0), record.offset + 1)

    def done(self, record: ConsumerRecord) -> None:
        self.open[TopicPartition(record.topic, record.partition)].discard(record.offset)

    def committable(self) -> dict[TopicPartition, int]:
        """Up to the oldest offset still open (or everything fetched), where that moved forward."""
        out = {}
        for tp, next_offset in self.next.items():
            upto = min(self.open[tp]) if self.open[tp] else next_offset
            if upto > self.committed.get(tp, -1):
                out[tp] = self.committed[tp] = upto
        return out


class Worker:
    def __init__(self, settings: Settings, lm: LoadedModel, mode: str = "ar", worker_id: str | None = None,
                 batch: int = 1) -> None:
        self.settings = settings
        self.batch = batch
        self.lm = lm
        self.mode = mode
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.topics = Topics(settings.topic_prefix)
        self.stats = WorkerStats()
        self.context_limit = int(getattr(lm.model.config, "max_position_embeddings", 8192))
        cost = load_or_measure(lm.model, lm.model_id, lm.device, settings.cache_dir)
        self.dare = Dare(lm.model, lm.tokenizer, cost)
        self.pools = LivePools(self.dare)
        self.follower: PoolFollower | None = None
        self.ready = threading.Event()  # set once pools are loaded and partitions assigned
        self.in_hand: str | None = None  # request id being decoded
        self.stop = threading.Event()

    def prepare(self, request: PromptRequest) -> tuple[list[int], int, str, str | None]:
        """Input ids, token limit, mode and segment of a request; rejects what cannot be served."""
        max_new = request.max_new_tokens or self.settings.max_new_tokens
        input_ids = chat_input_ids(self.lm.tokenizer, request.prompt)
        if len(input_ids) + max_new > self.context_limit:
            raise PromptRejected(
                f"prompt of {len(input_ids)} tokens + {max_new} new tokens exceeds the model's context of {self.context_limit}",
                "too_long",
            )
        if self.follower is not None:
            self.follower.poll()  # pools as fresh as the topic
        segment = self.pools.segment_of(request.entity_kind, request.entity_id, request.segment)
        return input_ids, max_new, request.mode or self.mode, segment

    def answer(self, request: PromptRequest) -> KnowledgeRecord:
        """Decode one prompt into its knowledge record (pure of Kafka)."""
        input_ids, max_new, mode, segment = self.prepare(request)
        if mode == "ar":
            gen = greedy_generate(self.lm, input_ids, max_new)
            stats = DecodeStats(steps=gen.steps, new_tokens=len(gen.token_ids), mean_accepted=1.0 if gen.token_ids else 0.0,
                                wall_s=gen.wall_s, forward_s=gen.wall_s)
            return self.record(request, segment, mode, gen.token_ids, stats)
        out = self.dare.generate(input_ids, self.pools.sources(segment), mode, max_new)
        return self.record(request, segment, mode, out.token_ids, self.engine_stats(out.stats))

    def engine_stats(self, s: EngineStats) -> DecodeStats:
        cost = self.dare.cost
        verify_s = sum(cost.cost(1 + n) for n in s.drafted)
        SPEEDUP.set(sum(s.accepted) * cost.cost(1) / verify_s if verify_s else 1.0)  # from the cost curve: load-independent
        return DecodeStats(steps=s.steps, new_tokens=s.new_tokens, mean_accepted=s.mean_accepted, wall_s=s.wall_s,
                           retrieval_s=s.retrieval_s, forward_s=s.forward_s + s.prefill_s)

    def record(self, request: PromptRequest, segment: str | None, mode: str, token_ids: list[int], stats: DecodeStats
               ) -> KnowledgeRecord:
        text = self.lm.tokenizer.decode(token_ids, skip_special_tokens=True)  # type: ignore[attr-defined]
        if text.strip():  # the paper's code: a generated text drafts for the next request at once
            self.pools.add_text(segment, f"{request.entity_kind}-{request.entity_id}", text)
        return KnowledgeRecord(
            request_id=request.request_id,
            entity_kind=request.entity_kind,
            entity_id=request.entity_id,
            segment=segment,
            text=text,
            token_count=len(token_ids),
            mode=mode,  # type: ignore[arg-type]
            model=self.lm.model_id,
            stats=stats,
            worker=self.worker_id,
        )

    def run(self, stop: threading.Event, max_prompts: int | None = None, idle_timeout_s: float | None = None) -> WorkerStats:
        """Consume until `stop` is set, `max_prompts` were answered, or nothing arrived for `idle_timeout_s`.
        If the broker goes away, delivery is retried with backoff until it is back (or, once stopping,
        for STOP_GRACE_S; the prompt then stays uncommitted and is answered again later)."""
        self.stop = stop
        ensure_topics(self.settings, [self.topics.prompts, self.topics.knowledge, self.topics.dead_letter,
                                      self.topics.pools, self.topics.assignments])
        self.follower = PoolFollower(self.settings, self.pools)
        applied = self.follower.poll(timeout_ms=500)
        log.info("pools loaded", updates=applied, segments=len(self.pools.pools), assignments=len(self.pools.assignments))
        self.producer = self._new_producer()
        # One prompt per poll (batched: as many as the batch has room for) keeps the time between
        # polls to one decode, or one batch step: no rebalance storms.
        consumer = make_consumer(self.settings, "worker", group_id(self.settings, GROUP), [self.topics.prompts], max_poll_records=1)
        self._last_message = time.monotonic()
        log.info("worker started", worker=self.worker_id, mode=self.mode, batch=self.batch, topic=self.topics.prompts)
        try:
            (self._run_batched if self.batch > 1 else self._run_single)(consumer, stop, max_prompts, idle_timeout_s)
        except Undelivered:
            pass  # logged; the uncommitted prompts are answered again after a restart
        finally:
            self.ready.clear()
            READY.set(0)
            close_producer(self.producer)
            consumer.close(autocommit=False)
            self.follower.close()
            log.info("worker stopped", worker=self.worker_id, prompts=self.stats.prompts, dead_lettered=self.stats.dead_lettered)
        return self.stats

    def _poll(self, consumer, timeout_ms: int, max_records: int) -> list[ConsumerRecord]:  # type: ignore[no-untyped-def]
        batch = consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        if not consumer.assignment():  # joining or rebalancing: not idle
            self._last_message = time.monotonic()
        elif not self.ready.is_set():
            self.ready.set()
            READY.set(1)
            log.info("worker ready", partitions=len(consumer.assignment()))
        records = [r for rs in batch.values() for r in rs]
        if records:
            self._last_message = time.monotonic()
        return records

    def _finished(self, max_prompts: int | None, idle_timeout_s: float | None) -> bool:
        if max_prompts is not None and self.stats.prompts + self.stats.dead_lettered >= max_prompts:
            return True
        return idle_timeout_s is not None and time.monotonic() - self._last_message > idle_timeout_s

    def _run_single(self, consumer, stop: threading.Event, max_prompts: int | None, idle_timeout_s: float | None) -> None:  # type: ignore[no-untyped-def]
        while not stop.is_set() and not self._finished(max_prompts, idle_timeout_s):
            for record in self._poll(consumer, 500, 1):
                self._handle(record)
                commit(consumer, {TopicPartition(record.topic, record.partition): record.offset + 1})
                LAG.set(consumer_lag(consumer))

    def _run_batched(self, consumer, stop: threading.Event, max_prompts: int | None, idle_timeout_s: float | None) -> None:  # type: ignore[no-untyped-def]
        """Continuous batching: fetched prompts join the batch while others decode; a partition's
        offset is committed up to its oldest prompt still in flight, once the records before it
        were acknowledged."""
        decoder = BatchDecoder(self.lm.model, self.dare.eos_token_ids, rows=self.batch, prefix=self.dare.prompt_prefix)
        inflight: dict[tuple[str, int, int], tuple[ConsumerRecord, PromptRequest, str, str | None]] = {}
        offsets = OffsetTracker()
        while not stop.is_set() and not (not len(decoder) and self._finished(max_prompts, idle_timeout_s)):
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
                decoder.add(key, input_ids, *self.dare.request(input_ids, self.pools.sources(segment), mode), max_new)
                inflight[key] = (record, request, mode, segment)
            for finished in decoder.step():
                record, request, mode, segment = inflight.pop(finished.key)  # type: ignore[index]
                with structlog.contextvars.bound_contextvars(request_id=request.request_id, partition=record.partition,
                                                             offset=record.offset):
                    knowledge = self.record(request, segment, mode, finished.token_ids, self.engine_stats(finished.stats))
                    self._publish(knowledge)
                offsets.done(record)
            commit(consumer, offsets.committable())
            LAG.set(consumer_lag(consumer))

    def _handle(self, record: ConsumerRecord) -> None:
        with structlog.contextvars.bound_contextvars(topic=record.topic, partition=record.partition, offset=record.offset):
            try:
                request = decode(PromptRequest, record.value)
                with structlog.contextvars.bound_contextvars(request_id=request.request_id):
                    self.in_hand = request.request_id
                    try:
                        knowledge = self.answer(request)
                    finally:
                        self.in_hand = None
                    self._publish(knowledge)
            except (SchemaError, PromptRejected) as exc:
                self._dead_letter(record, exc)

    def _publish(self, knowledge: KnowledgeRecord) -> None:
        self._deliver(self.topics.knowledge, knowledge.entity_id.encode(), encode(knowledge))
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
        self._deliver(self.topics.dead_letter, record.key, encode(letter))
        self.stats.dead_lettered += 1
        DEAD.labels(exc.error_type).inc()
        log.warning("prompt dead-lettered", reason=exc.reason, error_type=exc.error_type)

    def _new_producer(self):  # type: ignore[no-untyped-def]
        return make_producer(self.settings, "worker", max_block_ms=int(DELIVERY_ATTEMPT_S * 1000))

    def _deliver(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Produce and wait for the broker's acknowledgement, retrying with backoff while it is away.
        Each retry uses a fresh producer: an idempotent producer whose id the broker forgot (a
        restarted broker) never recovers by itself."""
        delay, attempt, stopping_since = 0.5, 0, None
        while True:
            attempt += 1
            try:
                if attempt > 1:
                    close_producer(self.producer, timeout_s=0)
                    self.producer = self._new_producer()
                self.producer.send(topic, key=key, value=value).get(timeout=DELIVERY_ATTEMPT_S)
                if attempt > 1:
                    log.info("broker reachable again: delivered", topic=topic, attempts=attempt)
                return
            except KafkaError as exc:
                if self.stop.is_set():
                    stopping_since = stopping_since or time.monotonic()
                    if time.monotonic() - stopping_since > STOP_GRACE_S:
                        log.error("stopping with an undelivered record; its prompt stays uncommitted and will be answered again",
                                  topic=topic, attempts=attempt)
                        raise Undelivered(topic) from exc
                log.warning("delivery failed; is the broker down? retrying", topic=topic, attempt=attempt, retry_in_s=delay,
                            error=repr(exc))
                self.stop.wait(delay)
                delay = min(delay * 2, 10.0)
