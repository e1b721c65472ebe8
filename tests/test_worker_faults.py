"""Fault tests with real worker processes against a real broker: nothing may be lost."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from dare.data import load_movielens, prompt_request
from infra.kafka import ensure_topics, make_producer, message_key
from infra.reader import read_topic
from schemas import KnowledgeRecord, PoolText, PoolUpdate, Topics, decode, encode

pytestmark = pytest.mark.integration

PROMPTS = 24
POOL_VERSION = 5


def start_worker(settings, model_cache, *extra):
    env = os.environ | {
        "DARE_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
        "DARE_TOPIC_PREFIX": settings.topic_prefix,
        "DARE_CACHE_DIR": str(model_cache),
        "DARE_MAX_NEW_TOKENS": "12",
        "DARE_THREADS": "1",
        "DARE_LOG_FORMAT": "json",
    }
    return subprocess.Popen([sys.executable, "-m", "dare.cli", "worker", "--device", "cpu", *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def produce_backlog(settings, segments=0):
    """PROMPTS item prompts; with `segments`, each in one of that many segments (keyed by it) whose pool, version
    POOL_VERSION, is on the pools topic first."""
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.all())
    ml = load_movielens()
    producer = make_producer(settings, "test")
    for n in range(segments):
        update = PoolUpdate(segment=f"g{n}", version=POOL_VERSION, kind="snapshot", added=[
            PoolText(text_id="t", text=f"The movie is a drama about family number {n}.")])
        producer.send(topics.pools, key=update.segment.encode(), value=encode(update))
    ids = []
    for n in range(PROMPTS):
        request = prompt_request(ml, "item", str(n + 1), request_id=f"job-{n}", mode="strict" if n % 2 else "ar",
                                 segment=f"g{n % segments}" if segments else None)
        producer.send(topics.prompts, key=message_key(request), value=encode(request))
        ids.append(request.request_id)
    producer.flush()
    producer.close()
    return ids


def answered(settings):
    return Counter(decode(KnowledgeRecord, r.value).request_id
                   for r in read_topic(settings, Topics(settings.topic_prefix).knowledge, timeout_s=3))


def wait_for(predicate, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(1.0)
    return False


def test_sigkill_mid_backlog_then_restart_loses_nothing(kafka_settings, model_cache, lm):
    ids = produce_backlog(kafka_settings)
    worker = start_worker(kafka_settings, model_cache)
    try:
        assert wait_for(lambda: len(answered(kafka_settings)) >= 4, 180), "the worker answered nothing"
        os.killpg(worker.pid, signal.SIGKILL)  # mid-decode, no goodbye
        worker.wait(10)
        worker = start_worker(kafka_settings, model_cache, "--idle-exit", "8")
        assert worker.wait(300) == 0
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    counts = answered(kafka_settings)
    assert set(ids) <= set(counts), f"lost: {sorted(set(ids) - set(counts))}"
    print(f"\n[faults] SIGKILL + restart: {len(ids)} prompts, {sum(counts.values()) - len(counts)} duplicates")


def test_a_worker_joins_and_one_leaves_mid_backlog(kafka_settings, model_cache, lm):
    """Two rebalances mid-backlog: nothing lost, and every prompt decoded with its segment's pool loaded (each worker
    holds only the pools of its prompt partitions)."""
    ids = produce_backlog(kafka_settings, segments=8)
    first = start_worker(kafka_settings, model_cache)
    second = None
    try:
        assert wait_for(lambda: len(answered(kafka_settings)) >= 3, 180)
        second = start_worker(kafka_settings, model_cache, "--idle-exit", "8")  # joins: rebalance
        assert wait_for(lambda: len(answered(kafka_settings)) >= 10, 180)
        os.killpg(first.pid, signal.SIGTERM)  # leaves gracefully: finishes its prompt, commits, closes
        assert first.wait(60) == 0
        assert second.wait(300) == 0
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    counts = answered(kafka_settings)
    assert set(ids) <= set(counts), f"lost: {sorted(set(ids) - set(counts))}"
    records = [decode(KnowledgeRecord, r.value) for r in read_topic(kafka_settings, Topics(kafka_settings.topic_prefix).knowledge, timeout_s=3)]
    assert {(r.segment, r.pool_version) for r in records} == {(f"g{n}", POOL_VERSION) for n in range(8)}
    print(f"\n[faults] join + leave: {len(ids)} prompts, {sum(counts.values()) - len(counts)} duplicates")


def test_worker_rides_out_a_broker_outage_mid_decode(model_cache, lm, monkeypatch):
    """The broker goes away while a prompt decodes and comes back (empty: Tansu keeps topics in
    memory): the worker retries delivery with backoff, delivers, and serves new prompts."""
    import threading

    from infra.broker import EmbeddedBroker, free_port
    from infra.settings import Settings
    from workers.engine.backends.batch import BatchDecoder
    from workers.service import Worker

    step = BatchDecoder.step
    monkeypatch.setattr(BatchDecoder, "step", lambda self: time.sleep(0.05) or step(self))  # decoding outlasts the outage's start

    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    settings = Settings(bootstrap_servers=broker.bootstrap_servers, topic_prefix="outage.", max_new_tokens=120, cache_dir=model_cache)
    topics = Topics(settings.topic_prefix)
    ml = load_movielens()

    def send(request_id, item):
        ensure_topics(settings, topics.all())
        producer = make_producer(settings, "test")
        producer.send(topics.prompts, key=b"k", value=encode(prompt_request(ml, "item", item, request_id=request_id, mode="ar")))
        producer.flush()
        producer.close()

    worker, stop = Worker(settings, lm), threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"max_prompts": 2}, daemon=True)
    try:
        send("before", "1")
        thread.start()
        assert wait_for(lambda: "before" in worker.decoding(), 120), "the worker never started decoding"
        broker.stop()  # mid-decode: the knowledge record has nowhere to go
        time.sleep(4)
        broker = EmbeddedBroker(port=port).start()
        ensure_topics(settings, topics.all())  # an operator recreating the topics on the fresh broker
        assert wait_for(lambda: "before" in answered(settings), 120), "not delivered after the broker came back"
        send("after", "2")
        thread.join(180)
        assert not thread.is_alive() and worker.stats.prompts == 2
        assert set(answered(settings)) == {"before", "after"}
    finally:
        stop.set()
        thread.join(30) if thread.is_alive() else None
        broker.stop()
