"""JSON (de)serialization of wire messages, in one place, with one error type."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

from schemas.messages import ALL_MESSAGES, Message

M = TypeVar("M", bound=Message)


class SchemaError(ValueError):
    """A message's bytes are not valid JSON of the expected schema. `reason` is human-readable."""

    def __init__(self, reason: str, error_type: str = "schema") -> None:
        super().__init__(reason)
        self.reason = reason
        self.error_type = error_type


def encode(message: Message) -> bytes:
    return message.model_dump_json().encode("utf-8")


def decode(cls: type[M], data: bytes | None) -> M:
    """Parse bytes into `cls`, or raise SchemaError saying exactly what is wrong."""
    if data is None:
        raise SchemaError("message has no value (tombstone)", "empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SchemaError(f"value is not UTF-8: {exc}", "undecodable") from None
    try:
        return cls.model_validate_json(text)
    except ValidationError as exc:
        kind = "json" if any(e["type"] == "json_invalid" for e in exc.errors()) else "schema"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:8]
        )
        raise SchemaError(f"invalid {cls.__name__}: {problems}", kind) from None


def export_json_schemas(directory: Path) -> list[Path]:
    """Write one JSON Schema file per message type for downstream teams."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, cls in ALL_MESSAGES.items():
        path = directory / f"{name}.schema.json"
        path.write_text(json.dumps(cls.model_json_schema(mode="serialization"), indent=2) + "\n")
        written.append(path)
    return written
