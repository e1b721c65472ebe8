"""The pool builder's state, free of Kafka: events in, pool updates and assignments out.

- Items: a MiniLM vector each (encoded in batches when item events arrive), segment = first genre.
- Users: rating-weighted running means of item vectors (no model call per rating); ratings for
  items not seen yet wait (bounded) until the item arrives.
- User segments: FAISS k-means, re-fitted when asked (on a schedule, or after enough new
  users), with ids kept stable by matching new centroids to old ones.
- Neighbourhoods: at each re-fit a FAISS inner-product index over all user vectors gives every
  segment the users nearest its centroid (`neighbourhood` x the mean segment size). A user's
  knowledge enters the pool of its own segment and of every segment whose neighbourhood holds it,
  so users near a border feed both sides.
- Pools: per segment, at most `pool_cap` texts, ranked by the author's similarity to the
  segment centroid plus recency; a knowledge record enters its pools at once.
Every change is returned as messages for the caller to publish; `checkpoint.py` saves and loads the state.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import numpy as np

from pool_builder.embeddings import UserVectors, item_text
from pool_builder.segments import assign, fit_centroids, match_to_previous, nearest_users, segment_name
from schemas import ItemEvent, KnowledgeRecord, PoolText, PoolUpdate, SegmentAssignment, UserEvent
from schemas.messages import MAX_POOL_TEXTS_PER_MESSAGE

RECENCY_WEIGHT = 0.5  # a brand-new text outranks an old one from a user 0.5 cosine closer to the centre
USER_GROWTH = 1.2  # re-fit once the users grew by 20 % since the last fit,
RATING_GROWTH = 1.5  # or the ratings by 50 % (users' vectors move with their ratings)


def refit_due(users: int, ratings: int, k: int, fitted: bool, last: PoolBuilder) -> bool:
    """Whether segments should be fitted again: first once there are `k` users, then on growth since the last fit
    (`last` holds its counts)."""
    if users < k:
        return False
    return not fitted or users >= USER_GROWTH * last.users_at_refit or ratings >= RATING_GROWTH * last.ratings_at_refit


@dataclass
class Counters:
    user_events: int = 0
    item_events: int = 0
    knowledge: int = 0
    duplicates: int = 0
    empty_texts: int = 0
    unknown_items: int = 0
    refits: int = 0
    last_refit_s: float = 0.0


@dataclass
class SegmentPool:
    version: int = 0
    texts: OrderedDict[str, tuple[str, str, int]] = field(default_factory=OrderedDict)  # text id → (entity, text, seq)


class PoolBuilder:
    def __init__(self, encoder, segments: int = 8, pool_cap: int = 64, neighbourhood: float = 1.5,  # type: ignore[no-untyped-def]
                 snapshot_every: int = 50, dedup_window: int = 200_000, pending_cap: int = 100_000, shard: int = 0) -> None:
        self.encoder = encoder
        self.shard = shard  # the part of every segment's pool this builder writes (PoolUpdate.shard)
        self.k = segments
        self.pool_cap = pool_cap
        self.neighbourhood = neighbourhood  # x the mean segment size; 0: members only
        self.neighbours: dict[str, set[str]] = {}  # segment → users nearest its centroid
        self.snapshot_every = snapshot_every
        self.dedup_window = dedup_window
        self.pending_cap = pending_cap
        self.item_vectors: dict[str, np.ndarray] = {}
        self.item_segment: dict[str, str] = {}
        self.users = UserVectors()
        self.centroids: np.ndarray | None = None
        self.centroids_version = 0  # of the fit that gave the centroids: the version of the assignments made with them
        self.user_segment: dict[str, str] = {}
        self.pools: dict[str, SegmentPool] = defaultdict(SegmentPool)
        self.seen: OrderedDict[str, None] = OrderedDict()
        self.pending: dict[str, list[UserEvent]] = defaultdict(list)
        self.pending_count = 0
        self.clock = 0  # counts knowledge texts added: their recency
        self.users_at_refit = 0
        self.ratings_at_refit = 0  # ratings applied when the centroids were last fitted
        self.fresh_users: set[str] = set()  # users with ratings but no segment yet
        self.unplaced: dict[str, tuple[str, str, int]] = {}  # text id → entry: user texts whose author has no segment yet
        self.positions: dict[str, int] = {}  # input topic → the offset of the next message this state has not seen
        self.counters = Counters()

    # ------------------------------------------------------------------ events

    def _duplicate(self, key: str) -> bool:
        if key in self.seen:
            self.counters.duplicates += 1
            return True
        self.seen[key] = None
        if len(self.seen) > self.dedup_window:
            self.seen.popitem(last=False)
        return False

    def add_items(self, events: list[ItemEvent]) -> list[SegmentAssignment]:
        """Encode new items in one batch; apply ratings that were waiting for them."""
        fresh = [e for e in events if not self._duplicate(f"i:{e.event_id}")]
        self.counters.item_events += len(fresh)
        if not fresh:
            return []
        vectors = self.encoder.encode([item_text(e.title, e.year, e.genres) for e in fresh])
        out = []
        for event, vector in zip(fresh, vectors):
            self.item_vectors[event.item_id] = vector
            segment = f"g-{event.genres[0]}" if event.genres else "g-unknown"
            if self.item_segment.get(event.item_id) != segment:
                self.item_segment[event.item_id] = segment
                out.append(SegmentAssignment(entity_kind="item", entity_id=event.item_id, segment=segment, version=0))
        self.items_arrived([e.item_id for e in fresh])
        return out

    def items_arrived(self, item_ids: list[str]) -> None:
        """Apply the ratings that were waiting for these items (now in `item_vectors`, which builders of one
        process share)."""
        for item_id in item_ids:
            for waiting in self.pending.pop(item_id, []):
                self.pending_count -= 1
                self.users.add(waiting.user_id, self.item_vectors[item_id], waiting.rating)
                self.fresh_users.add(waiting.user_id)

    def add_user_event(self, event: UserEvent) -> None:
        if self._duplicate(f"u:{event.event_id}"):
            return
        self.counters.user_events += 1
        vector = self.item_vectors.get(event.item_id)
        if vector is None:
            self.counters.unknown_items += 1
            if self.pending_count < self.pending_cap:
                self.pending[event.item_id].append(event)
                self.pending_count += 1
            return
        self.users.add(event.user_id, vector, event.rating)
        if event.user_id not in self.user_segment:
            self.fresh_users.add(event.user_id)

    def add_knowledge(self, record: KnowledgeRecord) -> list[PoolUpdate]:
        """Put a knowledge record into its pools (evicting the weakest text of each)."""
        if self._duplicate(f"k:{record.request_id}"):
            return []
        if not record.text.strip():
            self.counters.empty_texts += 1
            return []
        self.counters.knowledge += 1
        self.clock += 1
        text_id = f"{record.entity_kind}-{record.entity_id}"
        entry = (record.entity_id if record.entity_kind == "user" else "", record.text, self.clock)
        segments = self.segments_for(record.entity_kind, record.entity_id, record.segment)
        if not segments and record.entity_kind == "user":  # a text read before its author's ratings (a rebuild)
            self.unplaced[text_id] = entry
            if len(self.unplaced) > self.pending_cap:  # bounded like ratings waiting for items: the oldest goes
                del self.unplaced[next(iter(self.unplaced))]
        out: list[PoolUpdate] = []
        for segment in segments:
            out += self._insert(segment, text_id, entry)
        return out

    def place_unplaced(self) -> list[PoolUpdate]:
        """User texts that arrived before their author had a segment, into their pools once it has one."""
        out: list[PoolUpdate] = []
        for text_id, entry in list(self.unplaced.items()):
            segments = self.segments_for("user", entry[0])
            if segments:
                del self.unplaced[text_id]
                for segment in segments:
                    out += self._insert(segment, text_id, entry)
        return out

    def segments_for(self, entity_kind: str, entity_id: str, fallback: str | None = None) -> list[str]:
        """The pools an entity's knowledge enters: its segment's, and (users) every neighbourhood it is in."""
        own = self.segment_of(entity_kind, entity_id) or fallback
        segments = [own] if own else []
        if entity_kind == "user":
            segments += sorted(s for s, users in self.neighbours.items() if entity_id in users and s != own)
        return segments

    def _insert(self, segment: str, text_id: str, entry: tuple[str, str, int]) -> list[PoolUpdate]:
        pool = self.pools[segment]
        removed = [text_id] if text_id in pool.texts else []
        pool.texts[text_id] = entry
        pool.texts.move_to_end(text_id)
        added = [PoolText(text_id=text_id, text=entry[1])]
        while len(pool.texts) > self.pool_cap:
            weakest = min(pool.texts, key=lambda t: self._score(segment, pool.texts[t]))
            del pool.texts[weakest]
            if weakest == text_id:
                added = []  # the new text ranks last: it does not enter (an older version, if any, is removed)
            else:
                removed.append(weakest)
        return self._publish(segment, added=added, removed=removed) if added or removed else []

    def segment_of(self, entity_kind: str, entity_id: str) -> str | None:
        return (self.user_segment if entity_kind == "user" else self.item_segment).get(entity_id)

    # ------------------------------------------------------------------ segments

    def needs_refit(self) -> bool:
        return refit_due(len(self.users.index), self.counters.user_events, self.k, self.centroids is not None, self)

    def refit(self) -> tuple[list[SegmentAssignment], list[PoolUpdate]]:
        """Re-cluster users; publish changed assignments and re-ranked pools."""
        _, matrix = self.users.matrix()
        centroids = self.fit(matrix, self.counters.user_events, self.centroids)
        return self.apply_centroids(centroids, self.centroids_version + 1)

    def fit(self, matrix: np.ndarray, ratings: int, previous: np.ndarray | None) -> np.ndarray:
        """k centroids of these user vectors, numbered to match the `previous` fit's; notes the counts the next fit
        is due from (`refit_due`) and the time it took. Here, or in a service over several partitions' users."""
        start = time.perf_counter()
        centroids = match_to_previous(fit_centroids(matrix, self.k), previous)  # type: ignore[arg-type]
        self.users_at_refit, self.ratings_at_refit = len(matrix), ratings
        self.counters.last_refit_s = time.perf_counter() - start
        return centroids

    def apply_centroids(self, centroids: np.ndarray, version: int) -> tuple[list[SegmentAssignment], list[PoolUpdate]]:
        """Segments from these centroids (fitted here or by another member): every user to its nearest one, the
        neighbourhoods of this builder's users, its texts to their authors' new pools; changed assignments and
        the re-ranked pools to publish."""
        self.centroids, self.centroids_version = centroids, version
        ids, matrix = self.users.matrix()
        changed = []
        if ids:
            for uid, label in zip(ids, assign(matrix, centroids)):
                segment = segment_name("user", int(label))
                if self.user_segment.get(uid) != segment:
                    self.user_segment[uid] = segment
                    changed.append(SegmentAssignment(entity_kind="user", entity_id=uid, segment=segment, version=version))
        self.fresh_users.clear()
        self.neighbours = self._neighbourhoods(ids, matrix) if ids else {}
        self.counters.refits += 1
        return changed, self._reassign_pools()

    def _neighbourhoods(self, ids: list[str], matrix: np.ndarray) -> dict[str, set[str]]:
        """Per segment, the users nearest its centroid (FAISS inner product on unit vectors)."""
        size = min(len(ids), int(self.neighbourhood * len(ids) / self.k))
        if size <= 0:
            return {}
        _, nearest = nearest_users(matrix, self.centroids, size)  # type: ignore[arg-type]
        return {segment_name("user", s): {ids[i] for i in row if i >= 0} for s, row in enumerate(nearest)}

    def assign_new_users(self) -> list[SegmentAssignment]:
        """Users first seen since the last re-fit join their nearest segment at once."""
        new = [u for u in self.fresh_users if u not in self.user_segment and u in self.users.index]
        if self.centroids is None or not new:
            return []
        self.fresh_users.clear()
        labels = assign(np.stack([self._user_vector(u) for u in new]), self.centroids)  # type: ignore[misc]
        out = []
        for uid, label in zip(new, labels):
            self.user_segment[uid] = segment_name("user", int(label))
            out.append(SegmentAssignment(entity_kind="user", entity_id=uid, segment=self.user_segment[uid], version=self.centroids_version))
        return out

    def _user_vector(self, user_id: str) -> np.ndarray | None:
        row = self.users.index.get(user_id)
        if row is None:
            return None
        v = self.users.sums[row]
        return v / max(float(np.linalg.norm(v)), 1e-9)

    def _score(self, segment: str, entry: tuple[str, str, int]) -> float:
        user_id, _, seq = entry
        recency = seq / max(1, self.clock)
        similarity = 0.0
        if user_id and self.centroids is not None and segment.startswith("u"):
            v = self._user_vector(user_id)
            if v is not None:
                similarity = float(v @ self.centroids[int(segment[1:])])
        return similarity + RECENCY_WEIGHT * recency

    def _reassign_pools(self) -> list[PoolUpdate]:
        """After a re-fit, user texts follow their authors to their new segments and neighbourhoods;
        every user pool is re-ranked to its cap and snapshotted."""
        entries = {tid: e for s, p in self.pools.items() if s.startswith("u") for tid, e in p.texts.items()} | self.unplaced
        self.unplaced = {}
        for segment in [s for s in self.pools if s.startswith("u")]:
            self.pools[segment].texts.clear()
        for text_id, entry in sorted(entries.items(), key=lambda te: te[1][2]):
            segments = self.segments_for("user", entry[0])
            if not segments:
                self.unplaced[text_id] = entry  # its author is still unknown here
            for segment in segments:
                self.pools[segment].texts[text_id] = entry
        updates = []
        for segment in sorted(s for s in self.pools if s.startswith("u")):
            pool = self.pools[segment]
            if len(pool.texts) > self.pool_cap:
                keep = sorted(pool.texts, key=lambda t: self._score(segment, pool.texts[t]), reverse=True)[: self.pool_cap]
                pool.texts = OrderedDict((t, pool.texts[t]) for t in sorted(keep, key=lambda t: pool.texts[t][2]))
            updates += self.snapshot(segment)
        return updates

    # ------------------------------------------------------------------ publishing

    def _publish(self, segment: str, added: list[PoolText], removed: list[str]) -> list[PoolUpdate]:
        pool = self.pools[segment]
        pool.version += 1
        if pool.version % self.snapshot_every == 0:
            return self.snapshot(segment, bump=False)
        return [PoolUpdate(segment=segment, shard=self.shard, version=pool.version, kind="delta", added=added, removed=removed)]

    def snapshot(self, segment: str, bump: bool = True) -> list[PoolUpdate]:
        """The whole pool, in chunks small enough for Kafka's default message limit."""
        pool = self.pools[segment]
        if bump:
            pool.version += 1
        texts = [PoolText(text_id=t, text=e[1]) for t, e in pool.texts.items()]
        chunks = [texts[i : i + MAX_POOL_TEXTS_PER_MESSAGE // 4] for i in range(0, len(texts), MAX_POOL_TEXTS_PER_MESSAGE // 4)] or [[]]
        return [PoolUpdate(segment=segment, shard=self.shard, version=pool.version, kind="snapshot", added=chunk, chunk=i, chunks=len(chunks))
                for i, chunk in enumerate(chunks)]

    def all_snapshots(self) -> list[PoolUpdate]:
        return [u for segment in sorted(self.pools) for u in self.snapshot(segment)]

    def all_assignments(self, items: bool = True) -> list[SegmentAssignment]:
        version = self.centroids_version
        return [SegmentAssignment(entity_kind="user", entity_id=u, segment=s, version=version) for u, s in self.user_segment.items()] + [
            SegmentAssignment(entity_kind="item", entity_id=i, segment=s, version=0) for i, s in (self.item_segment.items() if items else ())]
