"""Wire schemas: every message, its JSON codec, topic names, and how pool updates apply."""

from schemas.codec import SchemaError, decode, encode, export_json_schemas
from schemas.messages import (
    ALL_MESSAGES,
    SCHEMA_VERSION,
    Centroids,
    DeadLetter,
    DecodeStats,
    ItemEvent,
    KnowledgeRecord,
    Message,
    Mode,
    PoolText,
    PoolUpdate,
    PromptRequest,
    SegmentAssignment,
    UserEvent,
)
from schemas.pools import PoolChange, PoolReplica
from schemas.topics import Topics

__all__ = [
    "ALL_MESSAGES",
    "SCHEMA_VERSION",
    "Centroids",
    "DeadLetter",
    "DecodeStats",
    "ItemEvent",
    "KnowledgeRecord",
    "Message",
    "Mode",
    "PoolChange",
    "PoolReplica",
    "PoolText",
    "PoolUpdate",
    "PromptRequest",
    "SchemaError",
    "SegmentAssignment",
    "Topics",
    "UserEvent",
    "decode",
    "encode",
    "export_json_schemas",
]
