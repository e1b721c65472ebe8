"""Against a real broker (see conftest for which one)."""

import socket
import time

import pytest
from kafka import TopicPartition

from infra.broker import BrokerError, EmbeddedBroker, port_in_use
from infra.kafka import BrokerUnavailable, end_offsets, ensure_topics, make_consumer, make_producer, wait_for_broker
from infra.reader import TopicReader, read_topic
from infra.settings import Settings

pytestmark = pytest.mark.integration


def poll_values(consumer, want: int, timeout_s: float = 30.0) -> list[bytes]:
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(values) < want and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            values += [r.value for r in records]
    return values


def test_produce_consume_with_keys_across_partitions(kafka_settings):
    topic = f"{kafka_settings.topic_prefix}events"
    ensure_topics(kafka_settings, [topic], partitions=3)
    producer = make_producer(kafka_settings, "test")
    for n in range(30):
        producer.send(topic, key=f"user-{n % 5}".encode(), value=f"v{n}".encode())
    producer.flush()
    records = list(read_topic(kafka_settings, topic, max_messages=30, timeout_s=10))
    assert sorted(r.value for r in records) == sorted(f"v{n}".encode() for n in range(30))
    assert len({r.partition for r in records}) > 1
    by_key: dict[bytes, set[int]] = {}
    for r in records:
        by_key.setdefault(r.key, set()).add(r.partition)
    assert all(len(parts) == 1 for parts in by_key.values())  # one key, one partition


def test_topics_are_created_with_the_configured_partitions_and_existing_ones_keep_theirs(kafka_settings):
    settings = kafka_settings.model_copy(update={"partitions": 6})
    old, new = f"{settings.topic_prefix}old", f"{settings.topic_prefix}new"
    ensure_topics(settings, [old], partitions=2)
    ensure_topics(settings, [old, new])  # DARE_PARTITIONS=6

    def partitions(topic: str) -> int:
        with TopicReader(settings, [topic], wait_s=10) as reader:  # it waits for the topic's metadata
            return len(reader.consumer.assignment())

    assert partitions(new) == 6
    assert partitions(old) == 2


def test_end_offsets_are_where_the_records_end_whatever_the_batches(kafka_settings):
    """Batches of several records: the offset after the last record (Tansu's ListOffsets alone answers the first
    offset of the last batch + 1), an empty partition 0; a checkpoint's position is judged against these."""
    topic = f"{kafka_settings.topic_prefix}batched"
    ensure_topics(kafka_settings, [topic], partitions=2)
    producer = make_producer(kafka_settings, "test", linger_ms=50)
    for batch in (1, 10, 37):
        for _ in range(batch):
            producer.send(topic, partition=0, value=b"x")
        producer.flush()
    ends = end_offsets(kafka_settings, [TopicPartition(topic, 0), TopicPartition(topic, 1)])
    assert ends == {TopicPartition(topic, 0): 48, TopicPartition(topic, 1): 0}


def test_committed_offsets_survive_a_consumer_restart(kafka_settings):
    topic = f"{kafka_settings.topic_prefix}jobs"
    group = f"{kafka_settings.topic_prefix}group"
    ensure_topics(kafka_settings, [topic], partitions=2)
    producer = make_producer(kafka_settings, "test")
    for n in range(10):
        producer.send(topic, value=f"first-{n}".encode())
    producer.flush()

    consumer = make_consumer(kafka_settings, "test", group, [topic])
    assert len(poll_values(consumer, 10)) == 10
    consumer.commit()
    consumer.close()

    for n in range(5):
        producer.send(topic, value=f"second-{n}".encode())
    producer.flush()
    consumer = make_consumer(kafka_settings, "test", group, [topic])
    values = poll_values(consumer, 5)
    time.sleep(1.0)
    values += poll_values(consumer, 1, timeout_s=1.0)  # nothing more may come
    consumer.close()
    assert sorted(values) == sorted(f"second-{n}".encode() for n in range(5))


def test_no_broker_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    settings = Settings(bootstrap_servers=f"127.0.0.1:{dead_port}")
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="no Kafka broker answered"):
        wait_for_broker(settings, timeout_s=3)
    assert time.monotonic() - start < 15


def test_embedded_broker_starts_and_stops_by_its_own_pid():
    broker = EmbeddedBroker().start()
    pid = broker.process.pid
    assert port_in_use(broker.port)
    broker.stop()
    time.sleep(0.2)
    assert not port_in_use(broker.port)
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)


def test_embedded_broker_refuses_a_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(BrokerError, match="already in use"):
            EmbeddedBroker(port=s.getsockname()[1]).start()
