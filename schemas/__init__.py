"""Wire schemas: every message, its JSON codec, and topic names."""

from schemas.codec import SchemaError, decode, encode, export_json_schemas
from schemas.messages import (
    ALL_MESSAGES,
    SCHEMA_VERSION,
    DeadLetter,
    DecodeStats,
    ItemEvent,
    KnowledgeRecord,
    Message,
    PoolText,
    PoolUpdate,
    PromptRequest,
    SegmentAssignment,
    UserEvent,
    assemble_snapshot,
)
from schemas.topics import Topics

__all__ = [
    "ALL_MESSAGES",
    "SCHEMA_VERSION",
    "DeadLetter",
    "DecodeStats",
    "ItemEvent",
    "KnowledgeRecord",
    "Message",
    "PoolText",
    "PoolUpdate",
    "PromptRequest",
    "SchemaError",
    "SegmentAssignment",
    "Topics",
    "UserEvent",
    "assemble_snapshot",
    "decode",
    "encode",
    "export_json_schemas",
]
