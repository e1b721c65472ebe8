"""`dare produce`: MovieLens-100k events and prompts, or a JSONL file of schema messages, into Kafka."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path

from dare.data import item_events, load_movielens, prompt_request, user_events
from dare.settings import Settings
from infra.kafka import ensure_topics, make_producer
from schemas import ALL_MESSAGES, Message, SchemaError, Topics, encode
from schemas.codec import decode

KEY_FIELDS = ("user_id", "item_id", "entity_id", "segment")


def message_key(message: Message) -> bytes | None:
    for name in KEY_FIELDS:
        value = getattr(message, name, None)
        if value:
            return str(value).encode()
    return None


def produce(settings: Settings, topic: str, messages: Iterable[Message], progress_every: int = 20_000) -> int:
    ensure_topics(settings, [topic])
    producer = make_producer(settings, "produce", linger_ms=20, batch_size=256 * 1024)
    start, n = time.perf_counter(), 0
    for n, message in enumerate(messages, start=1):
        producer.send(topic, key=message_key(message), value=encode(message))
        if n % progress_every == 0:
            print(f"  {topic}: {n} sent ({n / (time.perf_counter() - start):.0f}/s)", file=sys.stderr, flush=True)
    producer.flush()
    producer.close()
    return n


def movielens_messages(kind: str, limit: int | None, mode: str | None = None) -> tuple[str, Iterable[Message]]:
    """(topic attribute, messages) for 'user-events', 'item-events' or 'prompts' (user prompts)."""
    ml = load_movielens()
    if kind == "user-events":
        return "user_events", user_events(ml, limit)
    if kind == "item-events":
        return "item_events", list(item_events(ml))[:limit]
    users = sorted(ml.users, key=int)[:limit]
    return "prompts", (prompt_request(ml, "user", u, request_id=f"user-{u}-{int(time.time())}", mode=mode) for u in users)


def file_messages(path: Path, type_name: str) -> Iterable[Message]:
    """Schema-checked messages from a JSONL file; a bad line stops with its number."""
    cls = ALL_MESSAGES.get(type_name)
    if cls is None:
        raise SchemaError(f"unknown message type {type_name!r}: one of {', '.join(ALL_MESSAGES)}")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield decode(cls, line.encode())
                except SchemaError as exc:
                    raise SchemaError(f"{path}:{number}: {exc.reason}") from None


def topic_for(settings: Settings, attribute: str) -> str:
    return getattr(Topics(settings.topic_prefix), attribute)

