"""The pool builder's checkpoint: everything `PoolBuilder` knows, in a documented, versioned file.

Format 2 is a zip archive (read it with any zip tool, numpy and a JSON parser):

    state.json        {"format": 2, "config": {...}, "shard": n, "centroids_version": n,
                       "positions": {topic: next offset}, "items": [ids], "item_segment": {id: segment},
                       "users": [ids], "user_segment": {id: segment}, "neighbours": {segment: [ids]},
                       "pools": {segment: {"version": n, "texts": [[text_id, author, text, seq], ...]}},
                       "seen": [event keys, oldest first], "pending": {item_id: [UserEvent JSON]},
                       "fresh_users": [ids], "unplaced": [[text_id, author, text, seq], ...], "clock": n, "users_at_refit": n, "ratings_at_refit": n,
                       "counters": {...}}
    item_vectors.npy  float32 [items, dim], rows in the order of "items"
    user_sums.npy     float32 [users, dim], rows in the order of "users" (rating-weighted sums)
    user_counts.npy   int64 [users]
    centroids.npy     float32 [segments, dim], present once segments were fitted

A pool builder that runs several partitions (`service.py`) writes one file per partition without the items, and
one file of the items alone. Format 1 (before partitions) lacks "shard", "centroids_version", "positions",
"unplaced" and "ratings_at_refit": they load as 0 or empty (the centroids' version as the re-fit count).

`save` writes `<path>.partial`, syncs it to disk, then renames it over `<path>`: a crash leaves the
previous checkpoint whole. A later format version loads an older file with defaults for what it
lacks; a file from a newer format than this code knows is refused (`CheckpointVersionError`);
a damaged or truncated file raises `CheckpointError`.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections import OrderedDict, defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pool_builder.builder import Counters, PoolBuilder, SegmentPool
from pool_builder.embeddings import DIM
from schemas import UserEvent

FORMAT = 2


class CheckpointError(RuntimeError):
    """The checkpoint cannot be read (damaged, truncated, not a checkpoint)."""


class CheckpointVersionError(RuntimeError):
    """The checkpoint was written by a newer version of the pool builder."""


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def save(builder: PoolBuilder, path: Path, items: bool = True) -> None:
    """`items=False`: without the item vectors and segments (kept in a file of their own)."""
    n_users = len(builder.users.index)
    item_ids = list(builder.item_vectors) if items else []
    state = {
        "format": FORMAT,
        "config": {"segments": builder.k, "pool_cap": builder.pool_cap, "neighbourhood": builder.neighbourhood,
                   "snapshot_every": builder.snapshot_every, "dedup_window": builder.dedup_window,
                   "pending_cap": builder.pending_cap},
        "shard": builder.shard,
        "centroids_version": builder.centroids_version,
        "positions": builder.positions,
        "items": item_ids,
        "item_segment": builder.item_segment if items else {},
        "users": list(builder.users.index),
        "user_segment": builder.user_segment,
        "neighbours": {segment: sorted(users) for segment, users in builder.neighbours.items()},
        "pools": {segment: {"version": pool.version, "texts": [[text_id, *entry] for text_id, entry in pool.texts.items()]}
                  for segment, pool in builder.pools.items()},
        "seen": list(builder.seen),
        "pending": {item: [event.model_dump(mode="json") for event in events] for item, events in builder.pending.items()},
        "fresh_users": sorted(builder.fresh_users),
        "unplaced": [[text_id, *entry] for text_id, entry in builder.unplaced.items()],
        "clock": builder.clock,
        "users_at_refit": builder.users_at_refit,
        "ratings_at_refit": builder.ratings_at_refit,
        "counters": asdict(builder.counters),
    }
    arrays = {
        "item_vectors": np.stack([builder.item_vectors[i] for i in item_ids]) if item_ids else np.zeros((0, DIM), np.float32),
        "user_sums": builder.users.sums[:n_users],
        "user_counts": builder.users.counts[:n_users],
    }
    if builder.centroids is not None:
        arrays["centroids"] = builder.centroids
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
            archive.writestr("state.json", json.dumps(state))
            for name, array in arrays.items():
                archive.writestr(f"{name}.npy", _npy(np.ascontiguousarray(array)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def load(path: Path, encoder) -> PoolBuilder:  # type: ignore[no-untyped-def]
    try:
        with zipfile.ZipFile(path) as archive:
            state = json.loads(archive.read("state.json"))
            if not isinstance(state, dict) or not isinstance(state.get("format"), int):
                raise CheckpointError(f"{path}: state.json has no format version")
            if state["format"] > FORMAT:
                raise CheckpointVersionError(
                    f"{path} is checkpoint format {state['format']}, written by a newer pool builder; this one reads "
                    f"format {FORMAT} and older. Run the newer version, or delete the file to rebuild the state from the topics."
                )
            arrays = {name[:-4]: np.load(io.BytesIO(archive.read(name)), allow_pickle=False)
                      for name in archive.namelist() if name.endswith(".npy")}
        return _builder(state, arrays, encoder)
    except (CheckpointVersionError, CheckpointError):
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, IndexError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: unreadable pool-builder checkpoint ({exc!r})") from exc


def _builder(state: dict, arrays: dict[str, np.ndarray], encoder) -> PoolBuilder:  # type: ignore[no-untyped-def,type-arg]
    """A PoolBuilder from the file's content; fields the file lacks keep the constructor's defaults."""
    config = state.get("config", {})
    builder = PoolBuilder(encoder, **{k: v for k, v in config.items() if k in
                                      ("segments", "pool_cap", "neighbourhood", "snapshot_every", "dedup_window", "pending_cap")})
    items = state.get("items", [])
    vectors = arrays.get("item_vectors", np.zeros((0, DIM), np.float32))
    if len(vectors) != len(items):
        raise CheckpointError(f"item_vectors.npy has {len(vectors)} rows for {len(items)} items")
    builder.item_vectors = {item: vectors[n] for n, item in enumerate(items)}
    builder.item_segment = dict(state.get("item_segment", {}))
    users = state.get("users", [])
    sums, counts = arrays.get("user_sums"), arrays.get("user_counts")
    if users:
        if sums is None or counts is None or len(sums) != len(users) or len(counts) != len(users):
            raise CheckpointError(f"user arrays do not match the {len(users)} users")
        builder.users.index = {user: n for n, user in enumerate(users)}
        builder.users.sums, builder.users.counts = sums.astype(np.float32), counts.astype(np.int64)
    builder.centroids = arrays.get("centroids")
    builder.shard = int(state.get("shard", 0))
    builder.centroids_version = int(state.get("centroids_version", state.get("counters", {}).get("refits", 0)))
    builder.positions = {topic: int(offset) for topic, offset in state.get("positions", {}).items()}
    builder.user_segment = dict(state.get("user_segment", {}))
    builder.neighbours = {segment: set(ids) for segment, ids in state.get("neighbours", {}).items()}
    builder.pools = defaultdict(SegmentPool)
    for segment, pool in state.get("pools", {}).items():
        builder.pools[segment] = SegmentPool(pool["version"], OrderedDict(
            (text_id, (author, text, seq)) for text_id, author, text, seq in pool["texts"]))
    builder.seen = OrderedDict.fromkeys(state.get("seen", []))
    builder.pending = defaultdict(list, {item: [UserEvent.model_validate(e) for e in events]
                                         for item, events in state.get("pending", {}).items()})
    builder.pending_count = sum(len(events) for events in builder.pending.values())
    builder.fresh_users = set(state.get("fresh_users", []))
    builder.unplaced = {text_id: (author, text, seq) for text_id, author, text, seq in state.get("unplaced", [])}
    builder.clock = state.get("clock", 0)
    builder.users_at_refit = state.get("users_at_refit", 0)
    builder.ratings_at_refit = state.get("ratings_at_refit", 0)
    builder.counters = Counters(**{k: v for k, v in state.get("counters", {}).items() if k in Counters.__dataclass_fields__})
    return builder
