"""Kafka clients: settings in one place, topic creation, waiting for a broker, bulk producing.

Services never build kafka-python clients themselves; they call these, so that security
options, timeouts and retries are the same everywhere.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

import structlog
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from kafka.partitioner.default import murmur2

from infra.settings import Settings
from schemas import Message, PromptRequest, encode

log = structlog.get_logger("kafka")


class BrokerUnavailable(RuntimeError):
    """No broker answered at the configured bootstrap servers."""


def client_config(settings: Settings, role: str) -> dict[str, Any]:
    """kafka-python options common to producers, consumers and admin clients."""
    if not settings.bootstrap_servers:
        raise BrokerUnavailable("no bootstrap servers configured: pass --bootstrap-servers or set DARE_BOOTSTRAP_SERVERS")
    config: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers.split(","),
        "client_id": f"{settings.client_id}-{role}",
        "security_protocol": settings.security_protocol,
        "reconnect_backoff_max_ms": 5000,  # a broker that comes back is found within 5 s
    }
    if settings.sasl_mechanism:
        config["sasl_mechanism"] = settings.sasl_mechanism
        config["sasl_plain_username"] = settings.sasl_username
        config["sasl_plain_password"] = settings.sasl_password.get_secret_value() if settings.sasl_password else None
    for option in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        value = getattr(settings, option)
        if value is not None:
            config[option] = str(value)
    return config


def redacted(config: dict[str, Any]) -> dict[str, Any]:
    """A client config safe to log."""
    return {k: ("***" if "password" in k else v) for k, v in config.items()}


def make_producer(settings: Settings, role: str, **overrides: Any) -> KafkaProducer:
    config = client_config(settings, role) | {"acks": "all", "linger_ms": 5, "retries": 5} | overrides
    return KafkaProducer(**config)


def close_producer(producer: KafkaProducer, timeout_s: float = 5.0) -> None:
    """Close, delivering what is pending within `timeout_s`; kafka-python's close() raises while
    records are still pending (a broker that is away), so then force its sender thread to stop."""
    try:
        producer.close(timeout=timeout_s)
    except KafkaError as exc:
        log.warning("producer closed with undelivered records", error=repr(exc))
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.force_close()


def group_id(settings: Settings, service: str) -> str:
    """A service's consumer group, named under the topic prefix: deployments that share a cluster
    under different prefixes never share a group."""
    return f"{settings.topic_prefix}{service}"


def make_consumer(settings: Settings, role: str, group_id: str | None, topics: list[str], listener: Any = None,
                  **overrides: Any) -> KafkaConsumer:
    """A consumer with manual commits and group timings that suit both Tansu and Kafka; `listener`: a
    `ConsumerRebalanceListener` told of every change to the group's assignment."""
    config = client_config(settings, role) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
    } | overrides
    consumer = KafkaConsumer(**config)
    if topics:
        consumer.subscribe(topics, listener=listener)
    return consumer


def ensure_topics(settings: Settings, topics: list[str], partitions: int | None = None) -> None:
    """Create topics that do not exist yet, with `partitions` (default `settings.partitions`) partitions each;
    existing ones are left as they are."""
    partitions = partitions or settings.partitions
    admin = KafkaAdminClient(**client_config(settings, "admin"))
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(t, num_partitions=partitions, replication_factor=1) for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass  # a concurrent creator won
            log.info("topics created", topics=[t.name for t in missing], partitions=partitions)
    finally:
        admin.close()


def end_offsets(settings: Settings, partitions: list[TopicPartition], timeout_s: float = 10.0) -> dict[TopicPartition, int]:
    """The offset after each partition's last record. Kafka answers it to ListOffsets (`end_offsets`); the embedded
    Tansu answers the first offset of the last record batch + 1 there, short by the rest of that batch. So the
    last listed record of each non-empty partition is fetched too: a fetch's high watermark is exact on both."""
    if not partitions:
        return {}
    consumer = make_consumer(settings, "end-offsets", None, [])
    try:
        consumer.assign(partitions)
        listed = consumer.end_offsets(partitions)
        for tp, end in listed.items():
            consumer.seek(tp, max(0, end - 1))
        deadline = time.monotonic() + timeout_s
        while any(end and consumer.highwater(tp) is None for tp, end in listed.items()) and time.monotonic() < deadline:
            consumer.poll(timeout_ms=200)
        return {tp: max(end, consumer.highwater(tp) or 0) for tp, end in listed.items()}
    finally:
        consumer.close()


def wait_for_broker(settings: Settings, timeout_s: float | None = None) -> None:
    """Block until a broker answers, retrying with backoff and saying so in the log, for at most
    `timeout_s` (default: the `broker_timeout_s` setting)."""
    timeout_s = settings.broker_timeout_s if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            remaining_ms = max(1000, int((deadline - time.monotonic()) * 1000))
            admin = KafkaAdminClient(
                **client_config(settings, "probe"), request_timeout_ms=5000, bootstrap_timeout_ms=min(5000, remaining_ms)
            )
            admin.close()
            return
        except (KafkaError, OSError) as exc:
            if time.monotonic() + delay > deadline:
                raise BrokerUnavailable(
                    f"no Kafka broker answered at {settings.bootstrap_servers} within {timeout_s:g}s ({exc!r}); start one "
                    "(`dare broker`, or docker compose -f infra/kafka.yml up) or fix --bootstrap-servers / DARE_BOOTSTRAP_SERVERS"
                ) from None
            log.warning("broker not reachable, retrying", bootstrap_servers=settings.bootstrap_servers, retry_in_s=delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def produce(settings: Settings, topic: str, messages: Iterable[Message], progress_every: int = 20_000) -> int:
    """Send schema messages to `topic` (keyed by their entity) and wait until all are acknowledged."""
    ensure_topics(settings, [topic])
    producer = make_producer(settings, "produce", linger_ms=20, batch_size=256 * 1024)
    start, n = time.perf_counter(), 0
    try:
        for n, message in enumerate(messages, start=1):
            producer.send(topic, key=message_key(message), value=encode(message))
            if n % progress_every == 0:
                print(f"  {topic}: {n} sent ({n / (time.perf_counter() - start):.0f}/s)", file=sys.stderr, flush=True)
        producer.flush()
    finally:
        close_producer(producer)
    return n


KEY_FIELDS = ("user_id", "item_id", "entity_id", "segment")


def message_key(message: Message) -> bytes | None:
    """A message's partition key: the first of its entity fields that is set, except that a prompt with a
    segment is keyed by its segment, as the pools topic is: one segment's prompts and its pool share a partition
    number, so a worker follows only the pools of the prompt partitions it owns (workers/pools.py)."""
    if isinstance(message, PromptRequest) and message.segment:
        return message.segment.encode()
    for name in KEY_FIELDS:
        value = getattr(message, name, None)
        if value:
            return str(value).encode()
    return None


def partition_for(key: bytes, partitions: int) -> int:
    """The partition of `partitions` that the producers' default partitioner (murmur2, as Kafka's Java client)
    gives `key`."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
