"""One hop through the broker: the time from a message's production to its consumer's poll returning it, and
what an idle consumer costs, for several `fetch_max_wait_ms` (kafka-python's default 500 and `DARE_FETCH_WAIT_MS`).

A worker's prompt and its knowledge record each make one such hop. Kafka answers a waiting fetch as soon as a
message arrives; a broker that answers only when the wait runs out adds up to the whole wait to every hop.

    .venv/bin/python -P bench/hop_latency.py            # the embedded broker
    DARE_BOOTSTRAP_SERVERS=host:9092 .venv/bin/python -P bench/hop_latency.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from contextlib import ExitStack

from infra.broker import EmbeddedBroker
from infra.kafka import ensure_topics, make_consumer, make_producer
from infra.process import cpu_seconds
from infra.settings import Settings


def hop(servers: str, wait_ms: int, messages: int, broker_pid: int | None) -> dict:
    settings = Settings(bootstrap_servers=servers, topic_prefix=f"hop{wait_ms}x{int(time.time())}.")
    topic = settings.topic_prefix + "t"
    ensure_topics(settings, [topic])
    consumer = make_consumer(settings, "hop", settings.topic_prefix + "g", [topic], fetch_max_wait_ms=wait_ms)
    while not consumer.assignment():
        consumer.poll(timeout_ms=100)
    # Idle: what polling an empty topic costs the consumer and the broker.
    broker0, own0, start = (cpu_seconds(broker_pid) if broker_pid else 0.0), cpu_seconds(), time.monotonic()
    while time.monotonic() - start < 10:
        consumer.poll(timeout_ms=500)
    broker1 = cpu_seconds(broker_pid) if broker_pid else 0.0
    idle = {"broker_cpu_share": (broker1 - broker0) / 10, "consumer_cpu_share": (cpu_seconds() - own0) / 10}
    # Hops: messages at irregular gaps, the consumer in a worker's idle poll (500 ms).
    producer = make_producer(settings, "hop", linger_ms=0)

    def send() -> None:
        for i in range(messages):
            time.sleep(0.137 + (i % 7) * 0.05)
            producer.send(topic, value=repr(time.time()).encode())
            producer.flush()

    sender = threading.Thread(target=send)
    sender.start()
    latency: list[float] = []
    while len(latency) < messages:
        for records in consumer.poll(timeout_ms=500).values():
            latency += [time.time() - float(r.value) for r in records]
    sender.join()
    producer.close()
    consumer.close()
    latency.sort()
    return {"fetch_max_wait_ms": wait_ms, "hop_p50_ms": 1000 * statistics.median(latency),
            "hop_p90_ms": 1000 * latency[int(0.9 * len(latency))], **idle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waits", default=f"500,{Settings().fetch_wait_ms}", help="fetch_max_wait_ms values to compare")
    parser.add_argument("--messages", type=int, default=40)
    args = parser.parse_args()
    with ExitStack() as stack:
        servers, broker_pid = os.environ.get("DARE_BOOTSTRAP_SERVERS"), None
        if not servers:
            broker = stack.enter_context(EmbeddedBroker())
            servers, broker_pid = broker.bootstrap_servers, broker.process.pid  # type: ignore[union-attr]
        rows = [hop(servers, int(w), args.messages, broker_pid) for w in args.waits.split(",")]
    print("| fetch_max_wait_ms | hop p50 ms | hop p90 ms | idle consumer: its CPU | the broker's CPU |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['fetch_max_wait_ms']} | {r['hop_p50_ms']:.1f} | {r['hop_p90_ms']:.1f} | {100 * r['consumer_cpu_share']:.1f} % "
              f"| {100 * r['broker_cpu_share']:.1f} % |")


if __name__ == "__main__":
    main()
