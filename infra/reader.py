"""Reading whole topics without a consumer group: every partition, from the beginning or from
where they end now. The demo's downstream view, the workers' pool follower and `dare consume`
all read through `TopicReader`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Self

from kafka import TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from infra.kafka import make_consumer
from infra.settings import Settings


class TopicReader:
    def __init__(self, settings: Settings, topics: list[str], from_beginning: bool = True, role: str = "reader",
                 wait_s: float = 0.0, fetch_wait_ms: int | None = None) -> None:
        """`wait_s`: how long to wait for a topic's partitions to show in the metadata (it may lag
        the topic's creation); a topic still without partitions then is read from none. `fetch_wait_ms`: the
        longest a fetch waits at the broker (default kafka-python's 500 ms; a reader whose latency counts passes
        `settings.fetch_wait_ms`)."""
        self.consumer = make_consumer(settings, role, None, [], **({"fetch_max_wait_ms": fetch_wait_ms} if fetch_wait_ms else {}))
        deadline = time.monotonic() + wait_s
        parts = []
        for topic in topics:
            partitions = self.consumer.partitions_for_topic(topic) or set()
            while not partitions and time.monotonic() < deadline:
                time.sleep(0.2)
                partitions = self.consumer.partitions_for_topic(topic) or set()
            parts += [TopicPartition(topic, p) for p in sorted(partitions)]
        self.consumer.assign(parts)
        if from_beginning:
            self.consumer.seek_to_beginning()
        else:
            self.consumer.seek_to_end()
            for tp in parts:  # resolve the end offsets now, before anything new is produced
                self.consumer.position(tp)

    def poll(self, timeout_ms: int = 200, max_records: int = 5000) -> list[ConsumerRecord]:
        batch = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        return [r for records in batch.values() for r in records]

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class UnknownTopic(LookupError):
    """The topic does not exist on the broker."""


def read_topic(settings: Settings, topic: str, max_messages: int | None = None, timeout_s: float = 10.0) -> Iterator[ConsumerRecord]:
    """A topic from the beginning, until `max_messages` were read or none arrived for `timeout_s`."""
    with TopicReader(settings, [topic], wait_s=timeout_s) as reader:
        if not reader.consumer.assignment():
            raise UnknownTopic(f"no topic {topic!r} at {settings.bootstrap_servers} (topics: "
                               f"{', '.join(sorted(reader.consumer.topics())) or 'none'})")
        n, last = 0, time.monotonic()
        while time.monotonic() - last < timeout_s:
            for record in reader.poll(max_records=500):
                yield record
                n += 1
                if max_messages is not None and n >= max_messages:
                    return
                last = time.monotonic()
