"""How the pools topic's updates apply: a segment's pool is the union of its shards (one per pool-builder
partition, `PoolUpdate.shard`); a snapshot replaces one shard once all its chunks arrived; a delta removes, then
adds. Every reader of the topic (the workers' live pools, tests, tools) applies updates through `PoolReplica`, so
they agree on what a pool holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.messages import PoolText, PoolUpdate


@dataclass
class PoolChange:
    """What one applied update did to a segment's pool (a snapshot: every text its shard held before is gone)."""

    segment: str
    snapshot: bool
    removed: list[str]
    added: list[PoolText]


@dataclass
class PoolReplica:
    pools: dict[str, dict[str, str]] = field(default_factory=dict)  # segment → text id → text (all its shards)
    shards: dict[tuple[str, int], set[str]] = field(default_factory=dict)  # (segment, shard) → its text ids
    shard_versions: dict[tuple[str, int], int] = field(default_factory=dict)  # version of each shard's last update
    staged: dict[tuple[str, int, int], list[PoolUpdate]] = field(default_factory=dict)  # snapshot chunks so far
    versions: dict[str, int] = field(default_factory=dict)  # segment → the sum of its shards' versions (`version`)

    def apply(self, update: PoolUpdate) -> PoolChange | None:
        """Apply one update; None while a snapshot still waits for chunks."""
        key = (update.segment, update.shard)
        ids = self.shards.setdefault(key, set())
        if update.kind == "delta":
            change = PoolChange(update.segment, False, list(update.removed), list(update.added))
        else:
            chunks = self._assemble(update)
            if chunks is None:
                return None
            change = PoolChange(update.segment, True, sorted(ids), [text for chunk in chunks for text in chunk.added])
        pool = self.pools.setdefault(update.segment, {})
        self.versions[update.segment] = self.versions.get(update.segment, 0) + update.version - self.shard_versions.get(key, 0)
        self.shard_versions[key] = update.version
        for text_id in change.removed:
            if text_id in ids:  # another shard's text of the same id stays
                ids.discard(text_id)
                pool.pop(text_id, None)
        for text in change.added:
            pool[text.text_id] = text.text
            ids.add(text.text_id)
        return change

    def version(self, segment: str) -> int | None:
        """The segment's pool version: the sum of its shards' (it grows with every update of any shard)."""
        return self.versions.get(segment)

    def _assemble(self, update: PoolUpdate) -> list[PoolUpdate] | None:
        """A snapshot's chunks in order once all have arrived, else None."""
        key = (update.segment, update.shard, update.version)
        chunks = self.staged.setdefault(key, [])
        chunks.append(update)
        if len({c.chunk for c in chunks}) < update.chunks:
            return None
        del self.staged[key]
        return sorted({c.chunk: c for c in chunks}.values(), key=lambda c: c.chunk)

    def drop(self, segment: str) -> None:
        """Forget a segment (its shards, versions and any chunks waiting): it is read again from the topic's start."""
        self.pools.pop(segment, None)
        self.versions.pop(segment, None)
        for table in (self.shards, self.shard_versions, self.staged):
            for key in [k for k in table if k[0] == segment]:
                del table[key]
