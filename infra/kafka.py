"""Kafka client plumbing: client settings in one place, and the few helpers services share.

Services never build kafka-python clients themselves; they call these, so that security
options, timeouts and retries are the same everywhere.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from dare.settings import Settings

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


def make_consumer(settings: Settings, role: str, group_id: str | None, topics: list[str], **overrides: Any) -> KafkaConsumer:
    """A consumer with manual commits and group timings that suit both Tansu and Kafka."""
    config = client_config(settings, role) | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
    } | overrides
    consumer = KafkaConsumer(**config)
    if topics:
        consumer.subscribe(topics)
    return consumer


def ensure_topics(settings: Settings, topics: list[str], partitions: int = 4) -> None:
    """Create topics that do not exist yet (existing ones are left as they are)."""
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


def wait_for_broker(settings: Settings, timeout_s: float = 60.0) -> None:
    """Block until a broker answers, retrying with backoff and saying so in the log."""
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
                    f"no Kafka broker answered at {settings.bootstrap_servers} within {timeout_s:.0f}s ({exc!r})"
                ) from None
            log.warning("broker not reachable, retrying", bootstrap_servers=settings.bootstrap_servers, retry_in_s=delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def consume_all(settings: Settings, topic: str, max_messages: int | None = None, timeout_s: float = 10.0):  # type: ignore[no-untyped-def]
    """Read a topic from the beginning, without a consumer group, until `max_messages` were
    read or none arrived for `timeout_s`. Yields kafka-python ConsumerRecords."""
    consumer = make_consumer(settings, "reader", None, [], consumer_timeout_ms=int(timeout_s * 1000))
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        deadline = time.monotonic() + timeout_s
        while not partitions and time.monotonic() < deadline:  # metadata may lag topic creation
            time.sleep(0.2)
            partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        for n, record in enumerate(consumer, start=1):
            yield record
            if max_messages is not None and n >= max_messages:
                return
    finally:
        consumer.close()
