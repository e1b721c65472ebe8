"""How the pools topic's updates apply: a snapshot replaces a segment's pool once all its chunks
arrived; a delta removes, then adds. Every reader of the topic (the workers' live pools, tests,
tools) applies updates through `PoolReplica`, so they agree on what a pool holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.messages import PoolText, PoolUpdate


@dataclass
class PoolChange:
    """What one applied update did to a segment's pool (a snapshot: everything before is gone)."""

    segment: str
    snapshot: bool
    removed: list[str]
    added: list[PoolText]


@dataclass
class PoolReplica:
    pools: dict[str, dict[str, str]] = field(default_factory=dict)  # segment → text id → text
    staged: dict[tuple[str, int], list[PoolUpdate]] = field(default_factory=dict)  # snapshot chunks so far
    versions: dict[str, int] = field(default_factory=dict)  # segment → version of the last update applied

    def apply(self, update: PoolUpdate) -> PoolChange | None:
        """Apply one update; None while a snapshot still waits for chunks."""
        if update.kind == "delta":
            change = PoolChange(update.segment, False, list(update.removed), list(update.added))
        else:
            chunks = self._assemble(update)
            if chunks is None:
                return None
            change = PoolChange(update.segment, True, list(self.pools.get(update.segment, {})),
                                [text for chunk in chunks for text in chunk.added])
        pool = self.pools.setdefault(update.segment, {})
        self.versions[update.segment] = update.version
        for text_id in change.removed:
            pool.pop(text_id, None)
        pool.update((text.text_id, text.text) for text in change.added)
        return change

    def _assemble(self, update: PoolUpdate) -> list[PoolUpdate] | None:
        """A snapshot's chunks in order once all have arrived, else None."""
        key = (update.segment, update.version)
        chunks = self.staged.setdefault(key, [])
        chunks.append(update)
        if len({c.chunk for c in chunks}) < update.chunks:
            return None
        del self.staged[key]
        return sorted({c.chunk: c for c in chunks}.values(), key=lambda c: c.chunk)

    def drop(self, segment: str) -> None:
        """Forget a segment (its pool, version and any chunks waiting): it is read again from the topic's start."""
        self.pools.pop(segment, None)
        self.versions.pop(segment, None)
        for key in [k for k in self.staged if k[0] == segment]:
            del self.staged[key]
