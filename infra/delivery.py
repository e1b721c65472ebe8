"""At-least-once, shared by both services: an output is acknowledged by the broker before the
input offsets it answers are committed, so a crash in between repeats work (a countable
duplicate) and never loses it.

- `Delivery`: produce one record and wait for its acknowledgement, retrying across broker outages.
- `OffsetTracker` + `commit`: per partition, commit up to the oldest record still in flight.
- `dead_letter`: a record that cannot be handled, with the reason and its original bytes.
- `consumer_lag`: records waiting in a consumer's partitions.
"""

from __future__ import annotations

import base64
import threading
import time

import structlog
from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError

from infra.kafka import close_producer, make_producer
from infra.settings import Settings
from schemas import DeadLetter

log = structlog.get_logger("delivery")

DELIVERY_ATTEMPT_S = 10.0  # one produce attempt: send + broker acknowledgement
STOP_GRACE_S = 10.0  # once stopping, how long an undeliverable record is retried before giving up


class Undelivered(RuntimeError):
    """A record could not be delivered before shutdown: its input stays uncommitted."""


class Delivery:
    """A producer whose `send` returns only once the broker has the record."""

    def __init__(self, settings: Settings, role: str, stop: threading.Event) -> None:
        self.settings, self.role, self.stop = settings, role, stop
        self.producer = self._new_producer()

    def _new_producer(self):  # type: ignore[no-untyped-def]
        return make_producer(self.settings, self.role, max_block_ms=int(DELIVERY_ATTEMPT_S * 1000))

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Produce and wait for the acknowledgement, retrying with backoff while the broker is away
        (once `stop` is set, for STOP_GRACE_S, then `Undelivered`). Each retry uses a fresh producer:
        an idempotent producer whose id the broker forgot (a restarted broker) never recovers by itself."""
        delay, attempt, stopping_since = 0.5, 0, None
        while True:
            attempt += 1
            try:
                if attempt > 1:
                    close_producer(self.producer, timeout_s=0)
                    self.producer = self._new_producer()
                self.producer.send(topic, key=key, value=value).get(timeout=DELIVERY_ATTEMPT_S)
                if attempt > 1:
                    log.info("broker reachable again: delivered", topic=topic, attempts=attempt)
                return
            except KafkaError as exc:
                if self.stop.is_set():
                    stopping_since = stopping_since or time.monotonic()
                    if time.monotonic() - stopping_since > STOP_GRACE_S:
                        log.error("stopping with an undelivered record; its input stays uncommitted and is handled again",
                                  topic=topic, attempts=attempt)
                        raise Undelivered(topic) from exc
                log.warning("delivery failed; is the broker down? retrying", topic=topic, attempt=attempt, retry_in_s=delay,
                            error=repr(exc))
                self.stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def close(self) -> None:
        close_producer(self.producer)


def dead_letter(record: ConsumerRecord, reason: str, error_type: str, service: str) -> DeadLetter:
    return DeadLetter(
        reason=reason[:4000],
        error_type=error_type,
        source_topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key_b64=base64.b64encode(record.key).decode() if record.key is not None else None,
        value_b64=base64.b64encode(record.value or b"").decode(),
        service=service,
    )


def consumer_lag(consumer: KafkaConsumer) -> int:
    """Records behind in the assigned partitions, from the high watermarks of recent fetches (no extra request)."""
    lag = 0
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is not None:
            lag += max(0, high - consumer.position(tp))
    return lag


def commit(consumer: KafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
    """Commit `offsets` (the next offset to read, per partition); a revoked partition's commit fails
    and the new owner handles those records again (countable duplicates, never a loss)."""
    if not offsets:
        return
    try:
        consumer.commit({tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()})
    except (CommitFailedError, KafkaError) as exc:
        log.warning("commit failed; records may be handled twice", error=repr(exc))


class OffsetTracker:
    """Per partition: offsets fetched and not yet answered; what may be committed."""

    def __init__(self) -> None:
        self.open: dict[TopicPartition, set[int]] = {}
        self.next: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}

    def polled(self, record: ConsumerRecord) -> None:
        tp = TopicPartition(record.topic, record.partition)
        self.open.setdefault(tp, set()).add(record.offset)
        self.next[tp] = max(self.next.get(tp, 0), record.offset + 1)

    def done(self, record: ConsumerRecord) -> None:
        self.open[TopicPartition(record.topic, record.partition)].discard(record.offset)

    def committable(self) -> dict[TopicPartition, int]:
        """Up to the oldest offset still open (or everything fetched), where that moved forward."""
        out = {}
        for tp, next_offset in self.next.items():
            upto = min(self.open[tp]) if self.open[tp] else next_offset
            if upto > self.committed.get(tp, -1):
                out[tp] = self.committed[tp] = upto
        return out
