"""`dare pool-builder`: the Kafka shell around PoolBuilder.

Loop: poll user events, item events and knowledge records (one consumer group); apply them;
publish pool updates (keyed by segment) and segment assignments (keyed by entity); every few
seconds, and on shutdown, checkpoint: flush the producer, write the state snapshot atomically,
then commit the input offsets. A crash replays at most the events since the last checkpoint,
and event ids already applied are skipped (counted as duplicates).

On start the service loads its snapshot and republishes every pool as a snapshot and every
assignment, so a worker can rebuild all pools from the topic's tail without compaction.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import structlog
from kafka import OffsetAndMetadata
from prometheus_client import Counter, Gauge, Histogram

from dare.settings import Settings
from infra.kafka import ensure_topics, group_id, make_consumer, make_producer
from pool_builder.builder import PoolBuilder
from schemas import ItemEvent, KnowledgeRecord, SchemaError, Topics, UserEvent, decode, encode
from workers.service import dead_letter

log = structlog.get_logger("pool_builder")

GROUP = "pool-builder"  # consumer group: the topic prefix + this ("dare.pool-builder" by default)

EVENTS = Counter("dare_pool_builder_events_total", "Events applied", ["kind"])
DEAD = Counter("dare_pool_builder_dead_letters_total", "Messages sent to the dead-letter topic")
SEGMENTS = Gauge("dare_pool_builder_segments", "Segments with a pool")
POOL_TEXTS = Gauge("dare_pool_builder_pool_texts", "Texts in a segment's pool", ["segment"])
REFIT = Histogram("dare_pool_builder_refit_seconds", "k-means re-fit time")
LAG = Gauge("dare_pool_builder_lag", "Input messages not yet consumed")
SKIPPED = Gauge("dare_pool_builder_skipped", "Inputs applied as no-ops since start, by reason", ["reason"])


class PoolBuilderService:
    def __init__(self, settings: Settings, state_dir: Path, segments: int = 8, pool_cap: int = 64, neighbourhood: float = 1.5,
                 refit_every_s: float = 30.0, checkpoint_every_s: float = 5.0, encoder=None) -> None:  # type: ignore[no-untyped-def]
        from pool_builder.embeddings import TextEncoder

        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.state_path = state_dir / "pool_builder.state"
        self.refit_every_s = refit_every_s
        self.checkpoint_every_s = checkpoint_every_s
        self.encoder = encoder or TextEncoder()
        if self.state_path.is_file():
            self.builder = PoolBuilder.loads(self.state_path.read_bytes(), self.encoder)
            log.info("state restored", path=str(self.state_path), users=len(self.builder.user_segment), pools=len(self.builder.pools))
        else:
            self.builder = PoolBuilder(self.encoder, segments=segments, pool_cap=pool_cap, neighbourhood=neighbourhood)
        self.ready = threading.Event()

    def run(self, stop: threading.Event, idle_exit_s: float | None = None) -> PoolBuilder:
        topics = self.topics
        ensure_topics(self.settings, [topics.user_events, topics.item_events, topics.knowledge, topics.pools,
                                      topics.assignments, topics.dead_letter])
        producer = make_producer(self.settings, "pool-builder")
        consumer = make_consumer(self.settings, "pool-builder", group_id(self.settings, GROUP), [topics.item_events, topics.user_events, topics.knowledge],
                                 max_poll_records=5000)
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
            producer.close(timeout=10)
            consumer.close()
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
            if message.__class__.__name__ == "PoolUpdate":
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

    def _checkpoint(self, consumer) -> None:  # type: ignore[no-untyped-def]
        """Flush what we published, persist the state, then commit what it covers."""
        self.producer.flush(timeout=30)
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.state_path.with_suffix(".partial")
        partial.write_bytes(self.builder.dumps())
        os.replace(partial, self.state_path)
        offsets = {tp: OffsetAndMetadata(consumer.position(tp), "", -1) for tp in consumer.assignment()}
        if offsets:
            consumer.commit(offsets)
            try:
                ends = consumer.end_offsets(list(offsets))
                LAG.set(sum(max(0, ends[tp] - o.offset) for tp, o in offsets.items()))
            except Exception:  # lag is a metric, never a reason to stop
                pass
        log.debug("checkpoint", offsets=len(offsets))


def read_pools(settings: Settings, timeout_s: float = 5.0) -> dict[str, dict[str, str]]:
    """Rebuild every pool from the pools topic (what a worker does at start): segment → text id → text."""
    from infra.kafka import consume_all
    from schemas import PoolUpdate, assemble_snapshot

    pools: dict[str, dict[str, str]] = {}
    staged: dict = {}  # type: ignore[type-arg]
    for record in consume_all(settings, Topics(settings.topic_prefix).pools, timeout_s=timeout_s):
        update = decode(PoolUpdate, record.value)
        if update.kind == "snapshot":
            chunks = assemble_snapshot(staged, update)
            if chunks is not None:
                pools[update.segment] = {t.text_id: t.text for c in chunks for t in c.added}
        else:
            pool = pools.setdefault(update.segment, {})
            for text_id in update.removed:
                pool.pop(text_id, None)
            pool.update({t.text_id: t.text for t in update.added})
    return pools
