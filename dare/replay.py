"""`dare produce`: a catalogue's events and prompts (MovieLens-100k by default), or a JSONL file of schema
messages (sent by `infra.kafka.produce`)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from dare.data import Catalogue, item_events, prompt_request, user_events
from infra.settings import Settings
from schemas import ALL_MESSAGES, Message, SchemaError, Topics, decode


def catalogue_messages(ml: Catalogue, kind: str, limit: int | None, mode: str | None = None) -> tuple[str, Iterable[Message]]:
    """(topic attribute, messages) for 'user-events', 'item-events' or 'prompts' (user prompts)."""
    if kind == "user-events":
        return "user_events", user_events(ml, limit)
    if kind == "item-events":
        return "item_events", list(item_events(ml))[:limit]
    users = ml.user_ids()[:limit]
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

