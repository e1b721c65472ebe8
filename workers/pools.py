"""The worker's pools: followed live from the pools and assignments topics.

Pools are partitioned like prompts: both topics are keyed by segment (a prompt without a segment by its
entity) and have as many partitions, so prompt partition p carries the prompts of the segments whose pools
are in pools partition p. A worker reads the pools partitions matching the prompt partitions the group gives
it (`PoolFollower.follow`, called on every rebalance): newly owned ones from their start, before it decodes
their prompts; the segments of partitions it lost are dropped. One worker alone owns every partition and holds
every pool. The assignments topic is read whole (entity → segment, for prompts that come without one).

Snapshots apply once all their chunks arrived, then deltas, into token-level pools. A merged global pool holds
every text this worker holds (the bench found segment + global drafting best). Texts this worker generates enter
its pools at once. Memory is bounded by each pool's node cap (oldest texts evicted first).
"""

from __future__ import annotations

import structlog
from kafka import TopicPartition

from infra.kafka import end_offsets, partition_for
from infra.reader import TopicReader
from infra.settings import Settings
from schemas import PoolReplica, PoolUpdate, SchemaError, SegmentAssignment, Topics, decode
from workers.engine import Pool, PoolTexts

log = structlog.get_logger("worker")


class LivePools:
    def __init__(self, texts: PoolTexts, segment_nodes: int = 200_000, global_nodes: int = 1_000_000) -> None:
        self.texts = texts
        self.segment_nodes = segment_nodes
        self.pools: dict[str, Pool] = {}
        self.global_pool = texts.pool([], max_nodes=global_nodes, label="global")
        self.assignments: dict[str, str] = {}
        self.replica = PoolReplica()
        self.applied = 0
        self.rejected = 0

    def _pool(self, segment: str) -> Pool:
        if segment not in self.pools:
            self.pools[segment] = self.texts.pool([], max_nodes=self.segment_nodes, label="segment")
        return self.pools[segment]

    def add_text(self, segment: str | None, text_id: str, text: str) -> None:
        if segment:
            self.texts.add_text(self._pool(segment), text_id, text)
        self.texts.add_text(self.global_pool, f"{segment}/{text_id}", text)

    def apply(self, update: PoolUpdate) -> None:
        change = self.replica.apply(update)
        if change is None:
            return
        pool = self._pool(change.segment)
        removed = list(change.removed)
        if change.snapshot:  # a shard's snapshot also drops the texts this worker added itself that no shard holds
            held = self.replica.pools.get(change.segment, {})
            removed += [t for t in pool.texts if t not in held and t not in removed]
        for text_id in removed:
            pool.remove(text_id)
            self.global_pool.remove(f"{change.segment}/{text_id}")
        for text in change.added:
            self.add_text(change.segment, text.text_id, text.text)
        self.applied += 1

    def drop(self, segment: str) -> None:
        """Forget a segment's pool (its texts leave the global pool too)."""
        pool = self.pools.pop(segment, None)
        for text_id in list(pool.texts) if pool is not None else []:
            self.global_pool.remove(f"{segment}/{text_id}")
        self.replica.drop(segment)

    def version(self, segment: str | None) -> int | None:
        """The version of the segment's pool as last updated from the topic (None: none held)."""
        return self.replica.version(segment) if segment else None

    def assign(self, assignment: SegmentAssignment) -> None:
        self.assignments[f"{assignment.entity_kind}:{assignment.entity_id}"] = assignment.segment

    def segment_of(self, entity_kind: str, entity_id: str, fallback: str | None = None) -> str | None:
        return self.assignments.get(f"{entity_kind}:{entity_id}", fallback)

    def sources(self, segment: str | None) -> list[tuple[Pool, float]]:
        """Drafting sources for a request: its segment's pool (if any) merged with the global pool."""
        sources = [(self.global_pool, 1.0)]
        if segment and segment in self.pools:
            sources.insert(0, (self.pools[segment], 1.0))
        return sources


class PoolFollower:
    """Tails the pools and assignments topics into LivePools; `poll()` between prompts."""

    def __init__(self, settings: Settings, live: LivePools, partitioned: bool = False) -> None:
        """`partitioned`: read no pool until `follow` names the partitions (a worker in a group); else every pool."""
        self.live = live
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.reader = TopicReader(settings, [self.topics.pools, self.topics.assignments], role="worker-pools")
        self.partitions = len(self.reader.consumer.partitions_for_topic(self.topics.pools) or ())
        self.owned = set(range(self.partitions))  # pools partitions read
        if partitioned:
            consumer = self.reader.consumer
            consumer.assign([tp for tp in consumer.assignment() if tp.topic != self.topics.pools])
            self.owned = set()

    def follow(self, prompt_partitions: set[int], prompt_count: int) -> None:
        """Hold the pools of these prompt partitions only (of `prompt_count`): read newly owned pools partitions
        from their start up to their end now, and drop the segments of partitions no longer owned. Pools and
        prompts partitioned differently (another partition count): every pool is kept."""
        consumer = self.reader.consumer
        if not self.partitions:  # the topic's metadata may lag its creation
            self.partitions = len(consumer.partitions_for_topic(self.topics.pools) or ())
        wanted = set(prompt_partitions) if prompt_count == self.partitions else set(range(self.partitions))
        if prompt_count != self.partitions:
            log.warning("prompts and pools are partitioned differently: this worker holds every pool",
                        prompts=prompt_count, pools=self.partitions)
        if wanted == self.owned:
            return
        new = [TopicPartition(self.topics.pools, p) for p in sorted(wanted - self.owned)]
        kept = [tp for tp in consumer.assignment() if tp.topic != self.topics.pools or tp.partition in wanted]
        consumer.assign(kept + new)
        for tp in new:
            consumer.seek_to_beginning(tp)
        for segment in [s for s in self.live.pools if partition_for(s.encode(), self.partitions) not in wanted]:
            self.live.drop(segment)
        self.owned = wanted
        ends = end_offsets(self.settings, new)
        while any(consumer.position(tp) < end for tp, end in ends.items()):  # caught up before any prompt decodes
            self.poll(timeout_ms=200)
        log.info("pools followed", partitions=sorted(wanted), segments=len(self.live.pools))

    def poll(self, timeout_ms: int = 0, max_rounds: int = 50) -> int:
        """Apply what has arrived; returns the number of messages applied."""
        n = 0
        for _ in range(max_rounds):
            records = self.reader.poll(timeout_ms=timeout_ms, max_records=2000)
            if not records:
                break
            for record in records:
                try:
                    if record.topic == self.topics.assignments:
                        self.live.assign(decode(SegmentAssignment, record.value))
                    else:
                        self.live.apply(decode(PoolUpdate, record.value))
                    n += 1
                except SchemaError:
                    self.live.rejected += 1  # the pool builder dead-letters its own inputs; skip, count
        return n

    def close(self) -> None:
        self.reader.close()
