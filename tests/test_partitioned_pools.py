"""Pools partitioned like prompts (issue 26), on a real broker: two workers of one group each hold only the pools
of the prompt partitions they own, a rebalance moves them, and every prompt reaches the worker holding its pool."""

import threading
import time

import pytest
from kafka.errors import KafkaError

from infra.kafka import ensure_topics, make_consumer, make_producer, message_key, partition_for, produce
from schemas import PoolText, PoolUpdate, PromptRequest, Topics, decode, encode
from workers.engine import DraftConfig, PoolTexts
from workers.pools import LivePools, PoolFollower
from workers.service import FollowPools

pytestmark = pytest.mark.integration

SEGMENTS = [f"s{n}" for n in range(16)]


class CharTokenizer:
    """Characters as tokens, no chat template: enough to build pools without a model."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def apply_chat_template(self, *args, **kwargs):
        raise ValueError("no chat template")


class Member:
    """A worker's Kafka side without its model: the prompts consumer of the group and its pool follower."""

    def __init__(self, settings, topics):
        self.live = LivePools(PoolTexts(CharTokenizer(), DraftConfig()))
        self.follower = PoolFollower(settings, self.live, partitioned=True)
        self.consumer = make_consumer(settings, "worker", f"{settings.topic_prefix}workers", [topics.prompts],
                                      listener=FollowPools(self.follower))
        self.prompts = []

    def poll(self):
        for records in self.consumer.poll(timeout_ms=100).values():
            for record in records:
                request = decode(PromptRequest, record.value)
                self.prompts.append((request, set(self.live.pools)))  # the pools held when it arrived
        try:
            self.consumer.commit()
        except KafkaError:  # mid-rebalance: committed at a later poll
            pass

    def start(self):
        """Poll in a thread of its own, as a worker process would (a joining member waits in its poll for the
        others to rejoin)."""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: [self.poll() for _ in iter(self.stop.is_set, True)], daemon=True)
        self.thread.start()
        return self

    def partitions(self):
        return {tp.partition for tp in self.consumer.assignment()}

    def close(self):
        self.stop.set()
        self.thread.join(timeout=30)
        self.consumer.close()
        self.follower.close()


def wait_until(members, done, timeout_s=90):
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, [m.partitions() for m in members]
        time.sleep(0.1)


def holds_its_share(member):
    """Whether the member holds exactly the pools of its partitions' segments (read while its thread may write)."""
    try:
        return set(member.live.pools) == {s for s in SEGMENTS if partition_for(s.encode(), 4) in member.partitions()}
    except RuntimeError:  # the pools changed while being read
        return False


def test_two_workers_hold_only_their_partitions_pools_and_get_their_prompts(kafka_settings):
    topics = Topics(kafka_settings.topic_prefix)
    ensure_topics(kafka_settings, [topics.prompts, topics.pools, topics.assignments])
    producer = make_producer(kafka_settings, "test")
    for segment in SEGMENTS:
        update = PoolUpdate(segment=segment, version=3, kind="snapshot", chunk=0, chunks=1,
                            added=[PoolText(text_id="t0", text=f"knowledge of {segment}")])
        producer.send(topics.pools, key=segment.encode(), value=encode(update))
    producer.flush()
    producer.close()
    partition_of = {s: partition_for(s.encode(), 4) for s in SEGMENTS}
    assert len(set(partition_of.values())) > 1  # the segments spread over partitions

    first = Member(kafka_settings, topics).start()
    wait_until([first], lambda: first.partitions() == {0, 1, 2, 3} and holds_its_share(first))
    assert set(first.live.pools) == set(SEGMENTS) and first.live.version("s0") == 3  # alone: every pool

    second = Member(kafka_settings, topics).start()  # joins: a rebalance splits the partitions
    members = [first, second]
    # the assignment is visible to this thread before the member's rebalance listener has loaded its pools
    wait_until(members, lambda: first.partitions() and second.partitions() and not first.partitions() & second.partitions()
               and first.partitions() | second.partitions() == {0, 1, 2, 3} and all(holds_its_share(m) for m in members))
    for m in members:
        assert set(m.live.pools) == {s for s in SEGMENTS if partition_of[s] in m.partitions()}
        assert len(m.live.pools) < len(SEGMENTS)
        assert all(f"{s}/t0" in m.live.global_pool.texts for s in m.live.pools)  # the global pool: its own texts only
        assert len(m.live.global_pool.texts) == len(m.live.pools)

    requests = [PromptRequest(request_id=f"r{n}", entity_kind="user", entity_id=str(n), prompt="p", segment=SEGMENTS[n % 16])
                for n in range(48)]
    assert message_key(requests[0]) == b"s0"  # a prompt with a segment is keyed by it, as its pool
    produce(kafka_settings, topics.prompts, requests)
    wait_until(members, lambda: len(first.prompts) + len(second.prompts) >= 48)
    for m in members:
        for request, held in m.prompts:
            assert request.segment in held  # its pool was loaded before it was polled
    assert sorted(r.request_id for m in members for r, _ in m.prompts) == sorted(r.request_id for r in requests)

    second.close()  # leaves: the first takes every partition back, and their pools
    wait_until([first], lambda: first.partitions() == {0, 1, 2, 3} and holds_its_share(first))
    assert set(first.live.pools) == set(SEGMENTS)
    first.close()
