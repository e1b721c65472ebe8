"""The worker's pools: followed live from the pools and assignments topics.

Every worker reads both topics whole (no consumer group: each needs all segments), applies
snapshots (once all their chunks arrived) and deltas to token-level pools, and keeps the
latest entity → segment assignment. A merged global pool holds every text too (the bench
found segment + global drafting best). Texts this worker generates enter its pools at once.
Memory is bounded by each pool's node cap (oldest texts evicted first).
"""

from __future__ import annotations

from infra.reader import TopicReader
from infra.settings import Settings
from schemas import PoolReplica, PoolUpdate, SchemaError, SegmentAssignment, Topics, decode
from workers.engine import Pool, PoolTexts


class LivePools:
    def __init__(self, texts: PoolTexts, segment_nodes: int = 200_000, global_nodes: int = 1_000_000) -> None:
        self.texts = texts
        self.segment_nodes = segment_nodes
        self.pools: dict[str, Pool] = {}
        self.global_pool = texts.pool([], max_nodes=global_nodes)
        self.assignments: dict[str, str] = {}
        self.replica = PoolReplica()
        self.applied = 0
        self.rejected = 0

    def _pool(self, segment: str) -> Pool:
        if segment not in self.pools:
            self.pools[segment] = self.texts.pool([], max_nodes=self.segment_nodes)
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
        # A snapshot replaces the whole pool, texts this worker added itself included.
        for text_id in list(pool.texts) if change.snapshot else change.removed:
            pool.remove(text_id)
            self.global_pool.remove(f"{change.segment}/{text_id}")
        for text in change.added:
            self.add_text(change.segment, text.text_id, text.text)
        self.applied += 1

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

    def __init__(self, settings: Settings, live: LivePools) -> None:
        self.live = live
        self.topics = Topics(settings.topic_prefix)
        self.reader = TopicReader(settings, [self.topics.pools, self.topics.assignments], role="worker-pools")

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
