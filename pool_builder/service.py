"""`dare pool-builder`: the Kafka shell around PoolBuilder; run one, or several in one consumer group.

Partitions. User events and knowledge records are keyed by entity and co-partitioned (same partition count),
so partition p of both carries the same users. The group (`<prefix>pool-builder`, range assignor) gives each
member some partitions p, and the member keeps one `PoolBuilder` per partition: that partition's users (their
rating-weighted vectors, segments and neighbourhoods) and shard p of every segment's pool (the texts of
partition p's entities; a worker's pool of a segment is the union of its shards). Item events are read whole
by every member (each needs every item's vector), and encoded once per member.

Segments. Users need one shared set of centroids: the member that owns partition 0 fits them (k-means over the
users of all its partitions — keys are hashed, so any partition's users are a random sample of all) whenever
its users grew by 20 % or its ratings by 50 %, and publishes them to the `centroids` topic (chunks, a version and
a fit id). Every member, itself included, applies the latest complete version to every partition it holds:
each user to its nearest centroid, each partition's neighbourhoods (its own users nearest each centroid, so
the union over partitions is the whole neighbourhood), its texts to their authors' new pools. Users first
seen between fits join their nearest segment at once.

Loop: poll item events, then user events and knowledge records; apply; publish pool updates (keyed by segment)
and assignments (keyed by entity); every few seconds, and on shutdown or when a partition is revoked,
checkpoint: flush the producer, write each changed partition's state with the input positions it covers (and
the items' with theirs) atomically, then commit. On assignment a partition's state is loaded from its
checkpoint and its input read on from the positions saved there; without one (first start, a damaged file,
or a partition that was another member's on another machine) it is rebuilt from the input's beginning.
Either way its every pool shard is republished as a snapshot, and its assignments, so a member that dies is
replaced by a rebalance with nothing lost.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import structlog
from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition
from prometheus_client import Counter, Gauge, Histogram

from infra.delivery import commit, consumer_lag, dead_letter
from infra.health import HEALTH
from infra.kafka import close_producer, end_offsets, ensure_topics, group_id, make_consumer, make_producer
from infra.reader import TopicReader
from infra.settings import Settings
from pool_builder import checkpoint
from pool_builder.builder import Counters, PoolBuilder, refit_due
from pool_builder.segments import CentroidsReplica, centroid_messages
from schemas import Centroids, ItemEvent, KnowledgeRecord, PoolUpdate, SchemaError, Topics, UserEvent, decode, encode

log = structlog.get_logger("pool_builder")

GROUP = "pool-builder"  # consumer group: the topic prefix + this ("dare.pool-builder" by default)

EVENTS = Counter("dare_pool_builder_events_total", "Events applied", ["kind"])
DEAD = Counter("dare_pool_builder_dead_letters_total", "Messages sent to the dead-letter topic")
SEGMENTS = Gauge("dare_pool_builder_segments", "Segments with a pool")
PARTITIONS = Gauge("dare_pool_builder_partitions", "Input partitions this member holds")
POOL_TEXTS = Gauge("dare_pool_builder_pool_texts", "Texts in a segment's pool, in this member's shards", ["segment"])
REFIT = Histogram("dare_pool_builder_refit_seconds", "k-means re-fit time")
LAG = Gauge("dare_pool_builder_lag", "Input messages not yet consumed")
SKIPPED = Gauge("dare_pool_builder_skipped", "Inputs applied as no-ops since start, by reason", ["reason"])
READY = Gauge("dare_pool_builder_ready", "1 once this member holds partitions, their state restored or rebuilt and caught up")


class Rebalance(ConsumerRebalanceListener):
    """Notes what the group changed; the service loop acts on it after the poll (kafka-python calls listeners
    on its network thread, where the consumer's blocking calls are not allowed)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changes: list[tuple[str, list[int]]] = []

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        with self.lock:
            self.changes.append(("revoked", sorted({tp.partition for tp in revoked})))

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        with self.lock:
            self.changes.append(("assigned", sorted({tp.partition for tp in assigned})))

    def take_changes(self) -> list[tuple[str, list[int]]]:
        with self.lock:
            changes, self.changes = self.changes, []
        return changes


class PoolBuilderService:
    def __init__(self, settings: Settings, state_dir: Path, segments: int = 8, pool_cap: int = 64, neighbourhood: float = 1.5,
                 refit_every_s: float = 30.0, checkpoint_every_s: float = 5.0, encoder=None) -> None:  # type: ignore[no-untyped-def]
        from pool_builder.embeddings import TextEncoder

        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.state_dir = state_dir
        self.config = {"segments": segments, "pool_cap": pool_cap, "neighbourhood": neighbourhood}
        self.refit_every_s = refit_every_s
        self.checkpoint_every_s = checkpoint_every_s
        self.encoder = encoder or TextEncoder()
        if (old := state_dir / "pool_builder.ckpt").is_file() or (old := state_dir / "pool_builder.state").is_file():
            log.warning("a state file of an older, unpartitioned version is ignored; the state is rebuilt from the topics",
                        path=str(old))
        self.items = self._restore(self.items_path) or PoolBuilder(self.encoder)  # items only: vectors and segments
        self.builders: dict[int, PoolBuilder] = {}  # partition → its users' state and pool shard
        self.dirty: set[int | str] = set()  # partitions (and "items") changed since their last checkpoint
        self.centroids = CentroidsReplica()
        self.partitions = 0  # of the user-events topic: pool caps are split over as many shards
        self.consumer: KafkaConsumer | None = None
        self.catching_up: dict[int, dict[str, int]] = {}  # partition → where its inputs ended when taken (until read so far)

    # ------------------------------------------------------------------ state

    @property
    def items_path(self) -> Path:
        return self.state_dir / "items.ckpt"

    def partition_path(self, partition: int) -> Path:
        return self.state_dir / f"pool_builder-p{partition}.ckpt"

    def _restore(self, path: Path) -> PoolBuilder | None:
        """A state from its checkpoint; None without one, or when it is damaged (moved aside, logged)."""
        if not path.is_file():
            return None
        try:
            builder = checkpoint.load(path, self.encoder)
        except checkpoint.CheckpointError as exc:
            aside = path.with_name(path.name + ".damaged")
            os.replace(path, aside)
            log.error("checkpoint unreadable: moved aside, rebuilding its state from the topics", error=str(exc), moved_to=str(aside))
            return None
        log.info("state restored", path=str(path), users=len(builder.users.index), pools=len(builder.pools))
        return builder

    @property
    def counters(self) -> Counters:
        """Every partition's counters added up (items counted once)."""
        total = Counters(item_events=self.items.counters.item_events, duplicates=self.items.counters.duplicates)
        for builder in self.builders.values():
            c = builder.counters
            total.user_events += c.user_events
            total.knowledge += c.knowledge
            total.duplicates += c.duplicates
            total.empty_texts += c.empty_texts
            total.unknown_items += c.unknown_items
            total.refits = max(total.refits, c.refits)
            total.last_refit_s = max(total.last_refit_s, c.last_refit_s)
        return total

    @property
    def user_segment(self) -> dict[str, str]:
        return {u: s for builder in self.builders.values() for u, s in builder.user_segment.items()}

    # ------------------------------------------------------------------ partitions

    def take(self, partitions: list[int]) -> None:
        """Newly assigned partitions: each from its checkpoint, read on from the positions saved there; else from
        the input's beginning. Its pool shards and assignments are republished."""
        consumer = self.consumer
        assert consumer is not None
        new = [p for p in partitions if p not in self.builders]
        checkpoints = {p: self._restore(self.partition_path(p)) for p in new}
        ends = end_offsets(self.settings, [TopicPartition(topic, p) for p in new for topic in (self.topics.user_events, self.topics.knowledge)])
        for tp, end in ends.items():  # ready once read this far (`readiness`)
            self.catching_up.setdefault(tp.partition, {})[tp.topic] = end
        ahead = self._beyond_the_end({p: c.positions for p, c in checkpoints.items() if c is not None}, ends)
        for p in new:
            restored = None if p in ahead else checkpoints[p]
            builder = restored or PoolBuilder(self.encoder, **self.config, shard=p)
            builder.pool_cap = math.ceil(self.config["pool_cap"] / max(1, self.partitions))
            builder.item_vectors, builder.item_segment = self.items.item_vectors, self.items.item_segment
            builder.items_arrived([i for i in list(builder.pending) if i in builder.item_vectors])
            for topic in (self.topics.user_events, self.topics.knowledge):
                tp = TopicPartition(topic, p)
                if topic not in builder.positions:
                    builder.positions[topic] = consumer.beginning_offsets([tp])[tp]
                consumer.seek(tp, builder.positions[topic])
            self.builders[p] = builder
            self._publish(self.republish(builder))
            self.dirty.add(p)
            log.info("partition taken", partition=p, restored=restored is not None, users=len(builder.users.index))
        PARTITIONS.set(len(self.builders))

    def republish(self, builder: PoolBuilder) -> list:  # type: ignore[type-arg]
        """A taken partition's every pool shard and user assignment, once each, under the latest centroids (a
        checkpoint older than the last fit is brought up to it first)."""
        if self.centroids.centroids is not None and self.centroids.version > builder.centroids_version:
            builder.apply_centroids(self.centroids.centroids, self.centroids.version)  # its changes are all in what follows
        return builder.all_snapshots() + builder.all_assignments(items=False)

    def _beyond_the_end(self, positions: dict[int, dict[str, int]], ends: dict[TopicPartition, int]) -> set[int]:
        """Of these partitions' checkpoints (their input positions), those that have read past where the inputs now
        end (`ends`): they belong to topics that are gone (a broker that lost its data), so they are set aside and the
        partition rebuilt from what the topics hold."""
        ahead = set()
        for p, at in positions.items():
            mine = {tp.topic: end for tp, end in ends.items() if tp.partition == p}
            if any(at.get(topic, 0) > end for topic, end in mine.items()):
                log.warning("checkpoint ahead of its input topics (were they recreated?): rebuilding the partition from "
                            "them", partition=p, positions=at, ends=mine)
                ahead.add(p)
        return ahead

    def readiness(self) -> tuple[bool, str]:
        """Ready once this member holds partitions whose state is restored or rebuilt up to where their inputs
        ended when they were taken (a member beyond the partition count holds none: never ready)."""
        for p, ends in list(self.catching_up.items()):
            if p in self.builders and all(self.builders[p].positions.get(topic, 0) >= end for topic, end in ends.items()):
                del self.catching_up[p]
        if not self.builders:
            return False, "no partitions held yet (joining the consumer group)"
        if self.catching_up:
            return False, f"catching up with the inputs of partition(s) {', '.join(map(str, sorted(self.catching_up)))}"
        return True, ""

    def rebalanced(self, listener: Rebalance) -> set[int]:
        """Act on the group's changes since the last poll; the partitions taken now."""
        taken: set[int] = set()
        for change, partitions in listener.take_changes():
            if change == "revoked":
                self.release(partitions)
                taken -= set(partitions)
            else:
                self.take(partitions)
                taken |= set(partitions)
        return taken

    def release(self, partitions: list[int]) -> None:
        """Revoked partitions: checkpointed (their next owner may read the file) and dropped. Any checkpoint is a
        consistent point (a state and the input positions it covers): a new owner that loads an older one reads the
        inputs on from there."""
        held = [p for p in partitions if p in self.builders]
        if not held:
            return
        self._checkpoint(only=held)
        for p in held:
            del self.builders[p]
            self.dirty.discard(p)
            self.catching_up.pop(p, None)
            log.info("partition released", partition=p)
        PARTITIONS.set(len(self.builders))

    # ------------------------------------------------------------------ loop

    def run(self, stop: threading.Event, idle_exit_s: float | None = None) -> PoolBuilderService:
        topics = self.topics
        ensure_topics(self.settings, [topics.user_events, topics.item_events, topics.knowledge, topics.pools,
                                      topics.assignments, topics.centroids, topics.dead_letter])
        self.producer = make_producer(self.settings, "pool-builder")
        self._publish(self.items.all_assignments())  # the items' segments (the partitions' users: when taken)
        items = TopicReader(self.settings, [topics.item_events], role="pool-builder-items", wait_s=10)
        for tp in items.consumer.assignment():
            if (key := f"{tp.topic}:{tp.partition}") in self.items.positions:
                items.consumer.seek(tp, self.items.positions[key])
        centroids = TopicReader(self.settings, [topics.centroids], role="pool-builder-centroids", wait_s=10)
        self._follow_centroids(centroids, until_end=True)  # the latest fit before any partition is taken
        consumer = make_consumer(self.settings, "pool-builder", group_id(self.settings, GROUP), [], max_poll_records=5000)
        self.consumer = consumer
        self.partitions = len(consumer.partitions_for_topic(topics.user_events) or ())
        knowledge_partitions = len(consumer.partitions_for_topic(topics.knowledge) or ())
        if knowledge_partitions != self.partitions:
            raise RuntimeError(f"{topics.knowledge} has {knowledge_partitions} partitions and {topics.user_events} "
                               f"{self.partitions}: the pool builder needs them co-partitioned (the same count)")
        listener = Rebalance()
        consumer.subscribe([topics.user_events, topics.knowledge], listener=listener)
        last_checkpoint = last_refit = last_message = time.monotonic()
        checkpoint_s = 0.0  # how long the last checkpoint took
        log.info("pool builder started", state=str(self.state_dir))
        try:
            while not stop.is_set():
                now = time.monotonic()
                HEALTH.beat()
                if self._poll_items(items) | self._follow_centroids(centroids):
                    last_message = now
                batch = consumer.poll(timeout_ms=200)
                taken = self.rebalanced(listener)
                if not consumer.assignment():  # still joining the group: not idle yet
                    last_message = now
                if batch:  # a partition taken in this poll is read again from its own position (seek in take)
                    self._apply([r for records in batch.values() for r in records if r.partition not in taken])
                    last_message = now
                idle = now - last_message > 1.0
                if self._needs_refit() and (idle or now - last_refit > self.refit_every_s):
                    self._refit()
                    last_refit = now
                # Every few seconds, or at least 9x as long as the last one took: a checkpoint writes the whole state
                # of each changed partition, so a large state is written less often, never more than ~10 % of the time.
                if self.dirty and (idle or now - last_checkpoint > max(self.checkpoint_every_s, 9 * checkpoint_s)):
                    self._checkpoint()
                    last_checkpoint, checkpoint_s = now, time.monotonic() - now
                ready, why = self.readiness()
                HEALTH.set_ready(ready, why)
                READY.set(int(ready))
                if idle_exit_s is not None and now - last_message > idle_exit_s and not self.dirty:
                    break
        finally:
            HEALTH.set_ready(False, "stopped")
            READY.set(0)
            if self.dirty:
                self._checkpoint()
            close_producer(self.producer, timeout_s=10)
            consumer.close(autocommit=False)
            items.close()
            centroids.close()
            log.info("pool builder stopped", partitions=sorted(self.builders), **vars(self.counters))
        return self

    def _poll_items(self, reader: TopicReader) -> bool:
        """Item events (every partition, every member): encoded once, shared by this member's partitions."""
        records = reader.poll(timeout_ms=0)
        if not records:
            return False
        events = []
        for record in records:
            try:
                events.append(decode(ItemEvent, record.value))
            except SchemaError as exc:
                self._dead_letter(record, exc)
            self.items.positions[f"{record.topic}:{record.partition}"] = record.offset + 1
        out = self.items.add_items(events)
        for builder in self.builders.values():
            builder.items_arrived([e.item_id for e in events])
        EVENTS.labels("item").inc(len(events))
        self.dirty.add("items")
        self._publish(out)
        return True

    def _follow_centroids(self, reader: TopicReader, until_end: bool = False) -> bool:
        """Apply a newer fit (another member's, or a previous owner's of partition 0) to every partition held."""
        got = False
        while True:
            records = reader.poll(timeout_ms=500 if until_end else 0)
            for record in records:
                try:
                    if self.centroids.apply(decode(Centroids, record.value)):
                        got = True
                except SchemaError as exc:
                    self._dead_letter(record, exc)
            if not records or not until_end:
                break
        if got:
            log.info("centroids followed", version=self.centroids.version, fitted_on=self.centroids.fitted_on)
            self._apply_centroids()
        return bool(got)

    def _apply_centroids(self) -> None:
        for p, builder in self.builders.items():
            if self.centroids.version > builder.centroids_version:
                assignments, updates = builder.apply_centroids(self.centroids.centroids, self.centroids.version)  # type: ignore[arg-type]
                self._publish(assignments + updates)
                self.dirty.add(p)

    def _needs_refit(self) -> bool:
        """The owner of partition 0 fits: when its users reach the segment count, then when its users grew by 20 % or
        its ratings by 50 % (the counts of the last fit are kept with partition 0's state)."""
        first = self.builders.get(0)
        if first is None:
            return False
        users = sum(len(b.users.index) for b in self.builders.values())
        ratings = sum(b.counters.user_events for b in self.builders.values())
        return refit_due(users, ratings, first.k, self.centroids.centroids is not None, first)

    def _refit(self) -> None:
        with REFIT.time():
            matrix = np.concatenate([b.users.matrix()[1] for b in self.builders.values() if b.users.index])
            first = self.builders[0]  # keeps the counts the next fit is due from
            fitted = first.fit(matrix, sum(b.counters.user_events for b in self.builders.values()), self.centroids.centroids)
            for message in centroid_messages(fitted, self.centroids.version + 1, fitted_on=len(matrix)):
                self.producer.send(self.topics.centroids, key=f"centroids/{message.chunk}".encode(), value=encode(message))
                self.centroids.apply(message)
            self._apply_centroids()
        log.info("segments re-fitted", version=self.centroids.version, users=len(matrix), refit_s=round(first.counters.last_refit_s, 2))

    def _apply(self, records: list) -> None:  # type: ignore[type-arg]
        topics = self.topics
        for record in records:
            builder = self.builders.get(record.partition)
            if builder is None or record.offset < builder.positions.get(record.topic, 0):  # revoked, or applied already
                continue
            try:
                if record.topic == topics.user_events:
                    builder.add_user_event(decode(UserEvent, record.value))
                    EVENTS.labels("user").inc()
                else:
                    self._publish(builder.add_knowledge(decode(KnowledgeRecord, record.value)))
                    EVENTS.labels("knowledge").inc()
            except SchemaError as exc:
                self._dead_letter(record, exc)
            builder.positions[record.topic] = record.offset + 1
            self.dirty.add(record.partition)
        for builder in self.builders.values():
            assigned = builder.assign_new_users()
            self._publish(assigned)
            if assigned and builder.unplaced:  # only a newly assigned author can place a waiting text here
                self._publish(builder.place_unplaced())

    def _dead_letter(self, record, exc: SchemaError) -> None:  # type: ignore[no-untyped-def]
        # Delivered with the next checkpoint's flush, before the offsets that cover it are committed.
        self.producer.send(self.topics.dead_letter, key=record.key,
                           value=encode(dead_letter(record, exc.reason, exc.error_type, "pool-builder")))
        DEAD.inc()

    def _publish(self, messages: list) -> None:  # type: ignore[type-arg]
        for message in messages:
            if isinstance(message, PoolUpdate):
                self.producer.send(self.topics.pools, key=message.segment.encode(), value=encode(message))
            else:
                self.producer.send(self.topics.assignments, key=message.entity_id.encode(), value=encode(message))

    def _checkpoint(self, only: list[int] | None = None) -> None:
        """Flush what we published, persist the changed states (each with the positions it covers), then commit."""
        self.producer.flush(timeout=30)
        for key in sorted(self.dirty if only is None else set(only) & self.dirty, key=str):
            if key == "items":
                checkpoint.save(self.items, self.items_path)
            else:
                checkpoint.save(self.builders[key], self.partition_path(key), items=False)  # type: ignore[index]
            self.dirty.discard(key)
        consumer = self.consumer
        if only is None and consumer is not None and consumer.assignment():  # for lag metrics and tools: positions are in the files
            commit(consumer, {tp: consumer.position(tp) for tp in consumer.assignment()})
            LAG.set(consumer_lag(consumer))
        self._metrics()
        log.debug("checkpoint", state=str(self.state_dir))

    def _metrics(self) -> None:
        counters = self.counters
        for reason, value in (("duplicate", counters.duplicates), ("empty_text", counters.empty_texts),
                              ("unknown_item", counters.unknown_items)):
            SKIPPED.labels(reason).set(value)
        texts: dict[str, int] = {}
        for builder in self.builders.values():
            for segment, pool in builder.pools.items():
                texts[segment] = texts.get(segment, 0) + len(pool.texts)
        SEGMENTS.set(len(texts))
        for segment, n in texts.items():
            POOL_TEXTS.labels(segment).set(n)
