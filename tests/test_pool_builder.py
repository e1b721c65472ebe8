"""The pool builder: its state machine with a fake encoder, and the service against a real broker."""

import hashlib
import threading
import time

import numpy as np
import pytest
from kafka import KafkaAdminClient

from dare.data import item_events, load_movielens, user_events
from infra.kafka import client_config, make_producer, produce
from infra.reader import read_topic
from pool_builder import checkpoint
from pool_builder.builder import PoolBuilder
from pool_builder.service import PoolBuilderService
from schemas import (
    DeadLetter,
    DecodeStats,
    ItemEvent,
    KnowledgeRecord,
    PoolReplica,
    PoolUpdate,
    SegmentAssignment,
    Topics,
    UserEvent,
    decode,
    encode,
)


class HashEncoder:
    """Deterministic unit vectors from text hashes, for fast tests; genre words dominate."""

    def encode(self, texts):
        out = []
        for text in texts:
            genre = text.split("Genres: ")[-1]
            seed = int(hashlib.md5(genre.encode()).hexdigest()[:8], 16)
            v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
            v += 0.3 * np.random.default_rng(int(hashlib.md5(text.encode()).hexdigest()[:8], 16)).standard_normal(384).astype(np.float32)
            out.append(v / np.linalg.norm(v))
        return np.stack(out)


def knowledge(entity_id, text, kind="user", request_id=None):
    return KnowledgeRecord(request_id=request_id or f"r-{kind}-{entity_id}", entity_kind=kind, entity_id=entity_id, text=text,
                           token_count=3, mode="ar", model="m", worker="w",
                           stats=DecodeStats(steps=3, new_tokens=3, mean_accepted=1.0, wall_s=0.1))


@pytest.fixture(scope="module")
def ml():
    return load_movielens()


@pytest.fixture(scope="module")
def fed(ml):
    builder = PoolBuilder(HashEncoder(), segments=5, pool_cap=4)
    builder.add_items(list(item_events(ml)))
    for event in user_events(ml, limit=30_000):
        builder.add_user_event(event)
    return builder


def test_every_user_gets_one_of_k_segments(fed):
    assignments, _ = fed.refit()
    assert len({a.segment for a in assignments}) == 5
    assert set(fed.user_segment) == set(fed.users.index)


def test_knowledge_lands_in_its_authors_pools_within_the_cap(fed):
    users = sorted(fed.user_segment, key=int)[:30]
    for uid in users:
        updates = fed.add_knowledge(knowledge(uid, f"user {uid} likes things"))
        # its own segment's pool, then its neighbourhoods' (none if it ranks below every full pool's texts)
        assert {u.segment for u in updates} <= set(fed.segments_for("user", uid))
    assert all(len(pool.texts) <= 4 for pool in fed.pools.values())
    newest = users[-1]
    assert f"user-{newest}" in fed.pools[fed.user_segment[newest]].texts  # the newest text survives eviction
    assert fed.add_knowledge(knowledge(users[0], "again", request_id=f"r-user-{users[0]}")) == []  # duplicate request
    assert fed.counters.duplicates >= 1


def test_neighbourhoods_come_from_faiss_and_feed_neighbouring_pools(ml):
    builder = PoolBuilder(HashEncoder(), segments=4, pool_cap=1000, neighbourhood=1.5)
    builder.add_items(list(item_events(ml)))
    for event in user_events(ml, limit=30_000):
        builder.add_user_event(event)
    builder.refit()
    members = {s: {u for u, seg in builder.user_segment.items() if seg == s} for s in set(builder.user_segment.values())}
    size = int(1.5 * len(builder.user_segment) / 4)
    assert all(len(users) == size for users in builder.neighbours.values())
    border = sorted(u for s, users in builder.neighbours.items() for u in users - members[s])
    assert border, "a neighbourhood of 1.5x the mean segment size reaches past some segment's members"
    uid = border[0]
    updates = builder.add_knowledge(knowledge(uid, "a user near a border"))
    assert {u.segment for u in updates} == set(builder.segments_for("user", uid)) and len(updates) >= 2
    assert builder.segments_for("user", uid)[0] == builder.user_segment[uid]  # its own segment first
    lonely = PoolBuilder(HashEncoder(), segments=4, neighbourhood=0)
    lonely.__dict__.update({k: v for k, v in builder.__dict__.items() if k not in ("neighbourhood", "neighbours")})
    assert lonely.segments_for("user", uid) == [builder.user_segment[uid]]  # members only


def test_empty_texts_are_counted_and_skipped(fed):
    uid = min(fed.user_segment, key=int)
    before = fed.counters.empty_texts
    assert fed.add_knowledge(knowledge(uid, "   \n", request_id="blank-1")) == []
    assert fed.counters.empty_texts == before + 1


def test_item_knowledge_goes_to_the_genre_pool(fed, ml):
    [update] = fed.add_knowledge(knowledge("1", "Toy Story is animated.", kind="item"))
    assert update.segment == f"g-{ml.items['1'].genres[0]}" and update.kind == "delta"


def test_refit_keeps_segment_ids_stable(fed):
    if fed.centroids is None:  # alone (not after the tests above): a first fit to keep
        fed.refit()
    before = dict(fed.user_segment)
    changed, _ = fed.refit()
    assert len(changed) < 0.1 * len(before)  # same data: (almost) nobody moves


def test_segments_are_fitted_again_when_users_or_their_ratings_grew():
    builder = PoolBuilder(HashEncoder(), segments=2)
    builder.add_items([ItemEvent(event_id=f"i{g}", item_id=g, title=g, genres=[g], timestamp=0) for g in ("Drama", "Horror")])

    def rate(n, users):
        for i in range(n):
            builder.add_user_event(UserEvent(event_id=f"r{builder.counters.user_events}", user_id=f"u{i % users}",
                                             item_id=("Drama", "Horror")[i % 2], rating=4.0, timestamp=1))

    rate(1, 1)
    assert not builder.needs_refit()  # fewer users than segments
    rate(10, 10)
    assert builder.needs_refit()
    builder.refit()
    assert not builder.needs_refit()
    rate(5, 10)  # the same users, 11 + 5 ratings: < 1.5x
    assert not builder.needs_refit()
    rate(1, 10)  # 17 ratings >= 1.5 x 11
    assert builder.needs_refit()
    builder.refit()
    for user in ("new-1", "new-2"):  # 12 users >= 1.2 x 10
        builder.add_user_event(UserEvent(event_id=f"e-{user}", user_id=user, item_id="Drama", rating=4.0, timestamp=1))
    assert builder.needs_refit()


def test_users_arriving_after_a_refit_join_their_nearest_segment(fed, ml):
    fed.refit()
    item = next(iter(fed.item_vectors))
    fed.add_user_event(UserEvent(event_id="late-1", user_id="late", item_id=item, rating=5.0, timestamp=1))
    [assignment] = fed.assign_new_users()
    assert assignment.entity_id == "late" and fed.user_segment["late"] == assignment.segment
    assert fed.assign_new_users() == []  # once only


def test_a_text_read_before_its_authors_ratings_waits_for_its_segment():
    """A partition rebuilt from the topics reads knowledge and ratings side by side: a text may come first."""
    builder = PoolBuilder(HashEncoder(), segments=2, neighbourhood=0)
    builder.add_items([ItemEvent(event_id=f"i{g}", item_id=g, title=g, genres=[g], timestamp=0) for g in ("Drama", "Horror")])
    for n, user in enumerate(("a", "b", "c", "d")):
        builder.add_user_event(UserEvent(event_id=f"r{n}", user_id=user, item_id=("Drama", "Horror")[n % 2], rating=4.0, timestamp=1))
    builder.refit()
    assert builder.add_knowledge(knowledge("early", "Likes silent films.", request_id="early-1")) == []
    builder.refit()
    assert list(builder.unplaced) == ["user-early"]  # a re-fit keeps it waiting
    builder.add_user_event(UserEvent(event_id="early-r", user_id="early", item_id="Drama", rating=4.0, timestamp=1))
    assert builder.place_unplaced() == []  # no segment yet
    builder.assign_new_users()
    updates = builder.place_unplaced()
    assert [u.segment for u in updates] == [builder.user_segment["early"]] and builder.unplaced == {}
    assert builder.pools[builder.user_segment["early"]].texts["user-early"][1] == "Likes silent films."


def test_ratings_for_unknown_items_wait_for_the_item():
    builder = PoolBuilder(HashEncoder(), segments=2)
    builder.add_user_event(UserEvent(event_id="e1", user_id="u", item_id="99", rating=5.0, timestamp=1))
    assert builder.counters.unknown_items == 1 and "u" not in builder.users.index
    builder.add_items([ItemEvent(event_id="i99", item_id="99", title="T", genres=["Drama"], timestamp=0)])
    assert "u" in builder.users.index


def state_of(builder):
    """Everything a checkpoint must keep, as plain comparable data."""
    n = len(builder.users.index)
    return {
        "config": (builder.k, builder.pool_cap, builder.neighbourhood, builder.snapshot_every, builder.dedup_window),
        "items": {i: v.tolist() for i, v in builder.item_vectors.items()}, "item_segment": builder.item_segment,
        "users": list(builder.users.index), "sums": builder.users.sums[:n].tolist(), "counts": builder.users.counts[:n].tolist(),
        "centroids": None if builder.centroids is None else builder.centroids.tolist(), "user_segment": builder.user_segment,
        "neighbours": builder.neighbours, "pools": {s: (p.version, list(p.texts.items())) for s, p in builder.pools.items()},
        "seen": list(builder.seen), "pending": {i: list(e) for i, e in builder.pending.items()}, "pending_count": builder.pending_count,
        "clock": builder.clock, "users_at_refit": builder.users_at_refit, "ratings_at_refit": builder.ratings_at_refit, "fresh_users": builder.fresh_users,
        "counters": builder.counters, "shard": builder.shard, "centroids_version": builder.centroids_version,
        "positions": builder.positions, "unplaced": builder.unplaced,
    }


def test_checkpoint_round_trip_keeps_every_field(fed, tmp_path):
    fed.refit()
    fed.add_knowledge(knowledge(next(iter(fed.user_segment)), "kept across a restart", request_id="ckpt-1"))
    fed.add_user_event(UserEvent(event_id="waits", user_id="u-new", item_id="no-such-item", rating=4.0, timestamp=1))
    fed.fresh_users.add("u-fresh")
    fed.positions = {"dare.user-events": 1234, "dare.knowledge": 5}
    fed.add_knowledge(knowledge("u-no-ratings-yet", "waits for its author's segment", request_id="ckpt-2"))
    assert list(fed.unplaced) == ["user-u-no-ratings-yet"]
    path = tmp_path / "pool_builder.ckpt"
    checkpoint.save(fed, path)
    restored = checkpoint.load(path, HashEncoder())
    assert state_of(restored) == state_of(fed)
    assert not path.with_name(path.name + ".partial").exists()
    restored.add_user_event(UserEvent(event_id="more", user_id="u-later", item_id=next(iter(fed.item_vectors)), rating=5.0, timestamp=2))
    assert "u-later" in restored.users.index  # the restored arrays grow


def test_an_older_checkpoint_loads_with_defaults_a_newer_one_is_refused(fed, tmp_path):
    import json
    import zipfile

    path = tmp_path / "pool_builder.ckpt"
    checkpoint.save(fed, path)
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    state = json.loads(members["state.json"])

    def rewrite(target, new_state, drop=()):
        with zipfile.ZipFile(target, "w") as archive:
            for name, data in members.items():
                if name not in drop:
                    archive.writestr(name, json.dumps(new_state) if name == "state.json" else data)
        return target

    older = {k: v for k, v in state.items() if k not in ("neighbours", "fresh_users", "counters", "shard", "centroids_version", "positions")}
    older["format"] = 1
    restored = checkpoint.load(rewrite(tmp_path / "old.ckpt", older, drop=("centroids.npy",)), HashEncoder())
    assert restored.neighbours == {} and restored.fresh_users == set() and restored.counters.refits == 0
    assert restored.shard == 0 and restored.centroids_version == 0 and restored.positions == {}
    assert restored.user_segment == fed.user_segment and restored.centroids is None
    uid = next(iter(restored.user_segment))
    assert restored.segments_for("user", uid) == [restored.user_segment[uid]]  # no neighbourhoods yet: members only
    assert restored.assign_new_users() == []
    with pytest.raises(checkpoint.CheckpointVersionError, match="format 3, written by a newer pool builder"):
        checkpoint.load(rewrite(tmp_path / "new.ckpt", state | {"format": 3}), HashEncoder())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no state"])
def test_a_damaged_checkpoint_is_a_clear_error(fed, tmp_path, damage):
    import zipfile

    path = tmp_path / "pool_builder.ckpt"
    checkpoint.save(fed, path)
    data = path.read_bytes()
    if damage == "no state":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("other.txt", "x")
    else:
        path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a zip" * 100, "empty": b""}[damage])
    with pytest.raises(checkpoint.CheckpointError, match="pool_builder.ckpt"):
        checkpoint.load(path, HashEncoder())


def test_snapshots_are_chunked_below_the_message_limit():
    builder = PoolBuilder(HashEncoder(), segments=2, pool_cap=500)
    builder.item_segment["1"] = "g-Drama"
    for n in range(300):
        builder.add_knowledge(knowledge("1", "x" * 3000, kind="item", request_id=f"r{n}"))
        builder.pools["g-Drama"].texts[f"t{n}"] = ("", "x" * 3000, n)
    chunks = builder.snapshot("g-Drama")
    assert len(chunks) > 1 and all(len(encode(c)) < 1_000_000 for c in chunks)
    assert {c.chunks for c in chunks} == {len(chunks)}


# ---------------------------------------------------------------------------- service


@pytest.mark.integration
def test_service_replay_knowledge_restart_and_dead_letters(kafka_settings, ml, tmp_path):
    settings = kafka_settings
    topics = Topics(settings.topic_prefix)
    produce(settings, topics.item_events, list(item_events(ml)))
    start = time.perf_counter()
    produce(settings, topics.user_events, user_events(ml))
    producer = make_producer(settings, "test")
    producer.send(topics.user_events, value=b"{garbage")
    producer.send(topics.item_events, value=b'{"schema_version": 1, "item_id": "x"}')
    producer.flush()

    def run_service():
        service = PoolBuilderService(settings, tmp_path, segments=6, pool_cap=8, encoder=HashEncoder())
        return service.run(threading.Event(), idle_exit_s=3.0)

    builder = run_service()
    print(f"\n[pool-builder] 100k ratings produced + consumed in {time.perf_counter() - start:.1f}s")
    assert builder.counters.user_events == 100_000
    assignments = [decode(SegmentAssignment, r.value) for r in read_topic(settings, topics.assignments, timeout_s=5)]
    user_segments = {a.entity_id: a.segment for a in assignments if a.entity_kind == "user"}
    assert len(user_segments) == 943 and len(set(user_segments.values())) == 6

    letters = [decode(DeadLetter, r.value) for r in read_topic(settings, topics.dead_letter, timeout_s=3)]
    assert sorted(letter.error_type for letter in letters) == ["json", "schema"]

    uid = "42"
    producer.send(topics.knowledge, key=uid.encode(), value=encode(knowledge(uid, "Likes film noir and westerns.")))
    producer.flush()
    refits = builder.counters.refits
    builder = run_service()  # a restart: state from the checkpoint, only the new record consumed
    assert builder.counters.user_events == 100_000
    assert builder.counters.refits == refits  # no partition rebuilt from the topics, so no fit due again
    pools = read_pools(settings)
    assert pools[user_segments[uid]][f"user-{uid}"] == "Likes film noir and westerns."
    assert builder.user_segment == user_segments  # segment ids kept across the restart
    assert all(len(texts) <= 8 for texts in pools.values())


def read_pools(settings):
    """Every pool as the pools topic describes it (what a worker rebuilds at start)."""
    replica = PoolReplica()
    for record in read_topic(settings, Topics(settings.topic_prefix).pools, timeout_s=5):
        replica.apply(decode(PoolUpdate, record.value))
    return replica.pools


@pytest.mark.integration
def test_a_damaged_checkpoint_is_moved_aside_and_the_state_rebuilt_from_the_topics(kafka_settings, ml, tmp_path):
    settings = kafka_settings
    topics = Topics(settings.topic_prefix)
    produce(settings, topics.item_events, list(item_events(ml)))
    produce(settings, topics.user_events, user_events(ml, limit=5_000))

    def run_service():
        service = PoolBuilderService(settings, tmp_path, segments=4, pool_cap=8, encoder=HashEncoder())
        return service.run(threading.Event(), idle_exit_s=3.0)

    first = run_service()
    paths = sorted(tmp_path.glob("pool_builder-p*.ckpt"))
    assert len(paths) == 4  # one state per partition of the input topics
    path = paths[0]
    users_in_it = checkpoint.load(path, HashEncoder()).counters.user_events
    path.write_bytes(path.read_bytes()[:100])  # a crash of the disk, not of the service: the rename was atomic
    rebuilt = run_service()  # no crash loop: a clear log line, then that partition's inputs again from the beginning
    assert path.with_name(path.name + ".damaged").is_file()
    assert rebuilt.counters.user_events == first.counters.user_events == 5_000
    assert rebuilt.user_segment.keys() == first.user_segment.keys()
    assert checkpoint.load(path, HashEncoder()).counters.user_events == users_in_it  # a good checkpoint again


@pytest.mark.integration
def test_checkpoints_ahead_of_recreated_topics_are_set_aside_and_the_partitions_rebuilt(kafka_settings, ml, tmp_path):
    """A broker that lost its data: the user-events topic deleted and filled again with fewer events than the
    checkpoints have read. Every partition is rebuilt from what the topic holds now."""
    settings = kafka_settings
    topics = Topics(settings.topic_prefix)
    produce(settings, topics.item_events, list(item_events(ml)))

    def run_service(ratings):
        produce(settings, topics.user_events, user_events(ml, limit=ratings))
        return PoolBuilderService(settings, tmp_path, segments=4, pool_cap=8, encoder=HashEncoder()).run(threading.Event(), idle_exit_s=3.0)

    assert run_service(5_000).counters.user_events == 5_000
    admin = KafkaAdminClient(**client_config(settings, "admin"))
    admin.delete_topics([topics.user_events])
    admin.close()
    assert run_service(1_000).counters.user_events == 1_000  # not 5,000 from the old checkpoints


def run_member(settings, state_dir):
    """A pool-builder member in a process of its own (forked: it can be SIGKILLed like a crashed machine)."""
    PoolBuilderService(settings, state_dir, segments=6, pool_cap=64, encoder=HashEncoder(), refit_every_s=2.0).run(threading.Event())


@pytest.mark.integration
def test_two_pool_builders_split_the_users_and_one_takes_over_from_a_killed_one(kafka_settings, ml, tmp_path):
    """Two members in one group, each with its own state directory (two machines): each holds some partitions'
    users; one is SIGKILLed mid-replay; the other takes its partitions over, rebuilds them from the topics, and
    every rating is applied, every user assigned."""
    import multiprocessing
    import os
    import signal

    settings = kafka_settings
    topics = Topics(settings.topic_prefix)
    ratings = list(user_events(ml))
    produce(settings, topics.item_events, list(item_events(ml)))
    produce(settings, topics.user_events, ratings[:50_000])
    doomed = multiprocessing.get_context("fork").Process(target=run_member, args=(settings, tmp_path / "a"), daemon=True)
    doomed.start()
    survivor = PoolBuilderService(settings, tmp_path / "b", segments=6, pool_cap=64, encoder=HashEncoder(), refit_every_s=2.0)
    stop = threading.Event()
    thread = threading.Thread(target=survivor.run, args=(stop,), daemon=True)
    thread.start()

    def wait_for(done, what, timeout_s=120):
        deadline = time.monotonic() + timeout_s
        while not done():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)

    def published_users():
        """Each user's latest assignment on the assignments topic."""
        latest = {}
        for record in read_topic(settings, topics.assignments, timeout_s=5):
            a = decode(SegmentAssignment, record.value)
            latest[(a.entity_kind, a.entity_id)] = a
        return {e: a for (kind, e), a in latest.items() if kind == "user"}

    try:
        wait_for(lambda: 0 < len(survivor.builders) < 4 and survivor.counters.user_events > 0, "the group to split the partitions")
        writers = sorted({e.user_id for e in ratings[:5_000]}, key=int)[:30]
        produce(settings, topics.knowledge, [knowledge(u, f"User {u} likes film noir.") for u in writers[:15]])
        time.sleep(1.0)
        held = set(survivor.builders)
        os.kill(doomed.pid, signal.SIGKILL)
        produce(settings, topics.user_events, ratings[50_000:])
        produce(settings, topics.knowledge, [knowledge(u, f"User {u} likes film noir.") for u in writers[15:]])
        wait_for(lambda: len(survivor.builders) == 4, "the survivor to take the killed member's partitions")
        assert held < set(survivor.builders)
        wait_for(lambda: survivor.counters.user_events == 100_000 and len(survivor.user_segment) == 943
                 and survivor.counters.knowledge == 30, "every rating, user and text")
        wait_for(lambda: {e: a.segment for e, a in published_users().items()} == survivor.user_segment, "the last updates published")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert survivor.counters.user_events == 100_000  # nothing lost, nothing applied twice
    users = published_users()
    assert len(users) == 943 and len({a.segment for a in users.values()}) == 6
    assert {e: a.segment for e, a in users.items()} == survivor.user_segment  # the topic ends where the survivor is
    pools = read_pools(settings)
    for u in writers:  # every text, those the killed member had taken included, in its author's segment's pool
        assert pools[survivor.user_segment[u]].get(f"user-{u}") == f"User {u} likes film noir."


def test_centroids_travel_in_chunks_and_only_a_complete_newer_fit_is_taken():
    from pool_builder.segments import CentroidsReplica, centroid_messages

    rng = np.random.default_rng(0)
    first, second = (rng.standard_normal((600, 384)).astype(np.float32) for _ in range(2))
    v1 = centroid_messages(first, version=1, fitted_on=10)
    v2 = centroid_messages(second, version=2, fitted_on=20)
    assert len(v1) == 3 and all(len(encode(m)) < 1_000_000 for m in v1)
    zombie = centroid_messages(first, version=2, fitted_on=5)  # another member's fit of the same version
    replica = CentroidsReplica()
    assert [replica.apply(m) for m in (v2[2], zombie[0], v2[0], zombie[1])] == [False] * 4  # neither fit complete
    assert replica.apply(v2[1]) and replica.version == 2 and np.array_equal(replica.centroids, second)
    assert not any(replica.apply(m) for m in v1 + zombie[2:])  # older, or the same version again: nothing changes
    assert np.array_equal(replica.centroids, second) and replica.fitted_on == 20 and replica.staged == {}


def test_a_partition_taken_with_an_older_fit_republishes_each_pool_and_user_once_under_the_latest(ml, tmp_path):
    """A checkpoint older than the group's last fit: its pools and assignments go out once, brought up to the fit."""
    from infra.settings import Settings
    from pool_builder.segments import centroid_messages

    builder = PoolBuilder(HashEncoder(), segments=4, pool_cap=8)
    builder.add_items(list(item_events(ml)))
    for event in user_events(ml, limit=5_000):
        builder.add_user_event(event)
    builder.refit()
    for uid in list(builder.user_segment)[:20]:
        builder.add_knowledge(knowledge(uid, f"Text of {uid}."))
    service = PoolBuilderService(Settings(), tmp_path, encoder=HashEncoder())
    _, vectors = builder.users.matrix()
    newer = builder.fit(vectors[::-1].copy(), 0, builder.centroids)  # another member's fit: other centroids, version 2
    for message in centroid_messages(newer[::-1].copy(), version=builder.centroids_version + 1, fitted_on=len(vectors)):
        service.centroids.apply(message)

    out = service.republish(builder)
    snapshots = [(m.segment, m.chunk) for m in out if isinstance(m, PoolUpdate)]
    assignments = [m for m in out if isinstance(m, SegmentAssignment)]
    assert sorted(snapshots) == sorted({(s, 0) for s in builder.pools}) and len(snapshots) == len(builder.pools)
    assert sorted(a.entity_id for a in assignments) == sorted(builder.user_segment)  # each user once
    assert {a.version for a in assignments} == {2} and builder.centroids_version == 2
    assert {a.entity_id: a.segment for a in assignments} == builder.user_segment
