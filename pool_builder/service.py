"""`dare pool-builder`: the Kafka shell around PoolBuilder.

Loop: poll user events, item events and knowledge records (one consumer group); apply them;
publish pool updates (keyed by segment) and segment assignments (keyed by entity); every few
seconds, and on shutdown, checkpoint: flush the producer, write the state (`checkpoint.py`)
atomically, then commit the input offsets. A crash replays at most the events since the last
checkpoint, and event ids already applied are skipped (counted as duplicates).

On start the service loads its checkpoint and republishes every pool as a snapshot and every
assignment, so a worker can rebuild all pools from the topic's tail without compaction. Without
a usable checkpoint (first start, or a damaged file, which is moved aside) it reads its input
topics from the beginning and rebuilds the state from them.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import structlog
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from infra.delivery import commit, consumer_lag, dead_letter
from infra.kafka import close_producer, ensure_topics, group_id, make_consumer, make_producer
from infra.settings import Settings
from pool_builder import checkpoint
from pool_builder.builder import PoolBuilder
from schemas import ItemEvent, KnowledgeRecord, PoolUpdate, SchemaError, Topics, UserEvent, decode, encode

log = structlog.get_logger("pool_builder")

GROUP = "pool-builder"  # consumer group: the topic prefix + this ("dare.pool-builder" by default)

EVENTS = Counter("dare_pool_builder_events_total", "Events applied", ["kind"])
DEAD = Counter("dare_pool_builder_dead_letters_total", "Messages sent to the dead-letter topic")
SEGMENTS = Gauge("dare_pool_builder_segments", "Segments with a pool")
POOL_TEXTS = Gauge("dare_pool_builder_pool_texts", "Texts in a segment's pool", ["segment"])
REFIT = Histogram("dare_pool_builder_refit_seconds", "k-means re-fit time")
LAG = Gauge("dare_pool_builder_lag", "Input messages not yet consumed")
SKIPPED = Gauge("dare_pool_builder_skipped", "Inputs applied as no-ops since start, by reason", ["reason"])


class FromTheBeginning(ConsumerRebalanceListener):
    """Seeks the first partitions assigned to the start of their topics: the state is rebuilt from scratch."""

    def __init__(self, consumer: KafkaConsumer) -> None:
        self.consumer, self.pending = consumer, True

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        pass

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self.pending and assigned:
            self.consumer.seek_to_beginning(*assigned)
            self.pending = False


class PoolBuilderService:
    def __init__(self, settings: Settings, state_dir: Path, segments: int = 8, pool_cap: int = 64, neighbourhood: float = 1.5,
                 refit_every_s: float = 30.0, checkpoint_every_s: float = 5.0, encoder=None) -> None:  # type: ignore[no-untyped-def]
        from pool_builder.embeddings import TextEncoder

        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.state_path = state_dir / "pool_builder.ckpt"
        self.refit_every_s = refit_every_s
        self.checkpoint_every_s = checkpoint_every_s
        self.encoder = encoder or TextEncoder()
        restored = self._restore()
        self.rebuild = restored is None  # no state: rebuilt from the input topics' beginnings
        self.builder = restored if restored is not None else PoolBuilder(self.encoder, segments=segments, pool_cap=pool_cap,
                                                                         neighbourhood=neighbourhood)
        self.ready = threading.Event()

    def _restore(self) -> PoolBuilder | None:
        """The state from the checkpoint; None without one, or when it is damaged (moved aside, logged)."""
        if (old := self.state_path.parent / "pool_builder.state").is_file():
            log.warning("a pickle state of an older version is ignored; the state is rebuilt from the topics", path=str(old))
        if not self.state_path.is_file():
            return None
        try:
            builder = checkpoint.load(self.state_path, self.encoder)
        except checkpoint.CheckpointError as exc:
            aside = self.state_path.with_name(self.state_path.name + ".damaged")
            os.replace(self.state_path, aside)
            log.error("checkpoint unreadable: moved aside, rebuilding the state from the topics", error=str(exc), moved_to=str(aside))
            return None
        log.info("state restored", path=str(self.state_path), users=len(builder.user_segment), pools=len(builder.pools))
        return builder

    def run(self, stop: threading.Event, idle_exit_s: float | None = None) -> PoolBuilder:
        topics = self.topics
        ensure_topics(self.settings, [topics.user_events, topics.item_events, topics.knowledge, topics.pools,
                                      topics.assignments, topics.dead_letter])
        producer = make_producer(self.settings, "pool-builder")
        consumer = make_consumer(self.settings, "pool-builder", group_id(self.settings, GROUP), [], max_poll_records=5000)
        inputs = [topics.item_events, topics.user_events, topics.knowledge]
        if self.rebuild:
            log.info("no state yet: reading the input topics from the beginning", topics=inputs)
            consumer.subscribe(inputs, listener=FromTheBeginning(consumer))
        else:
            consumer.subscribe(inputs)
        self.producer = producer
        self._publish(self.builder.all_snapshots() + self.builder.all_assignments())
        last_checkpoint = last_refit = last_message = time.monotonic()
        dirty = False
        self.ready.set()
        log.info("pool builder started", state=str(self.state_path))
        try:
            while not stop.is_set():
                batch = consumer.poll(timeout_ms=200)
                now = time.monotonic()
                if not consumer.assignment():  # still joining the group: not idle yet
                    last_message = now
                if batch:
                    self._apply([r for records in batch.values() for r in records])
                    last_message = now
                    dirty = True
                idle = now - last_message > 1.0
                if self.builder.needs_refit() and (idle or now - last_refit > self.refit_every_s):
                    self._refit()
                    last_refit = now
                    dirty = True
                if dirty and (idle or now - last_checkpoint > self.checkpoint_every_s):
                    self._checkpoint(consumer)
                    last_checkpoint, dirty = now, False
                if idle_exit_s is not None and now - last_message > idle_exit_s and not dirty:
                    break
        finally:
            if dirty:
                self._checkpoint(consumer)
            close_producer(producer, timeout_s=10)
            consumer.close(autocommit=False)
            log.info("pool builder stopped", **vars(self.builder.counters))
        return self.builder

    def _apply(self, records: list) -> None:  # type: ignore[type-arg]
        topics, builder = self.topics, self.builder
        items, users, knowledge = [], [], []
        for record in records:
            try:
                if record.topic == topics.item_events:
                    items.append(decode(ItemEvent, record.value))
                elif record.topic == topics.user_events:
                    users.append(decode(UserEvent, record.value))
                else:
                    knowledge.append(decode(KnowledgeRecord, record.value))
            except SchemaError as exc:
                # Delivered with the next checkpoint's flush, before the offsets that cover it are committed.
                self.producer.send(topics.dead_letter, key=record.key,
                                   value=encode(dead_letter(record, exc.reason, exc.error_type, "pool-builder")))
                DEAD.inc()
        out: list = []  # type: ignore[type-arg]
        out += builder.add_items(items)  # items first: ratings of this batch may need them
        for event in users:
            builder.add_user_event(event)
        out += builder.assign_new_users()
        for record in knowledge:
            out += builder.add_knowledge(record)
        EVENTS.labels("item").inc(len(items))
        EVENTS.labels("user").inc(len(users))
        EVENTS.labels("knowledge").inc(len(knowledge))
        self._publish(out)

    def _refit(self) -> None:
        with REFIT.time():
            assignments, updates = self.builder.refit()
        log.info("segments re-fitted", users=len(self.builder.user_segment), changed=len(assignments),
                 refit_s=round(self.builder.counters.last_refit_s, 2))
        self._publish(assignments + updates)

    def _publish(self, messages: list) -> None:  # type: ignore[type-arg]
        for message in messages:
            if isinstance(message, PoolUpdate):
                self.producer.send(self.topics.pools, key=message.segment.encode(), value=encode(message))
            else:
                self.producer.send(self.topics.assignments, key=message.entity_id.encode(), value=encode(message))
        SEGMENTS.set(len(self.builder.pools))
        counters = self.builder.counters
        for reason, value in (("duplicate", counters.duplicates), ("empty_text", counters.empty_texts),
                              ("unknown_item", counters.unknown_items)):
            SKIPPED.labels(reason).set(value)
        for segment, pool in self.builder.pools.items():
            POOL_TEXTS.labels(segment).set(len(pool.texts))

    def _checkpoint(self, consumer: KafkaConsumer) -> None:
        """Flush what we published, persist the state, then commit what it covers."""
        self.producer.flush(timeout=30)
        checkpoint.save(self.builder, self.state_path)
        commit(consumer, {tp: consumer.position(tp) for tp in consumer.assignment()})
        LAG.set(consumer_lag(consumer))
        log.debug("checkpoint", path=str(self.state_path))
