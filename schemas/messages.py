"""Every message on the wire, as pydantic v2 models.

Rules shared by all of them: a `schema_version` (bumped on incompatible change), unknown
fields rejected, strict types (no "5" for 5), texts non-blank and bounded in size.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

SCHEMA_VERSION = 1

MAX_ID_CHARS = 128
MAX_PROMPT_CHARS = 32_000  # a prompt beyond this is not a prompt, it is a mistake
MAX_TEXT_CHARS = 16_000  # knowledge text / pool text
MAX_POOL_TEXTS_PER_MESSAGE = 200  # keeps a pool update far below Kafka's ~1 MB default


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace only")
    return value


Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(_not_blank)]
PromptText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS), AfterValidator(_not_blank)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_CHARS), AfterValidator(_not_blank)]
Mode = Literal["ar", "strict", "relaxed"]
EntityKind = Literal["user", "item"]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    schema_version: Literal[1] = SCHEMA_VERSION


class UserEvent(Message):
    """A user rated an item (MovieLens: one rating row), optionally with the user's profile."""

    event_id: Id
    user_id: Id
    item_id: Id
    rating: float = Field(ge=0.0, le=5.0)
    timestamp: int = Field(ge=0, description="Unix seconds of the interaction")
    age: int | None = Field(None, ge=0, le=150)
    gender: Literal["M", "F", "O"] | None = None
    occupation: str | None = Field(None, max_length=64)


class ItemEvent(Message):
    """An item appeared or changed (title, year, genres)."""

    event_id: Id
    item_id: Id
    title: Text
    year: int | None = Field(None, ge=1800, le=2200)
    genres: list[Id] = Field(default_factory=list, max_length=32)
    timestamp: int = Field(ge=0)


class PromptRequest(Message):
    """A knowledge job: write text for one entity. `prompt` is the user message; the worker
    applies the model's chat template. `segment` may be left to the worker's assignment table."""

    request_id: Id
    entity_kind: EntityKind
    entity_id: Id
    prompt: PromptText
    segment: Id | None = None
    mode: Mode | None = None  # None: the worker's default
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    prompt_version: Id | None = None  # which templates wrote `prompt` (e.g. "kar-1a2b3c4d"); copied into the record
    created_at: float = Field(default_factory=time.time)


class DecodeStats(Message):
    steps: int = Field(ge=0)
    new_tokens: int = Field(ge=0)
    mean_accepted: float = Field(ge=0.0, description="tokens emitted per forward pass")
    wall_s: float = Field(ge=0.0)
    retrieval_s: float = Field(0.0, ge=0.0)
    forward_s: float = Field(0.0, ge=0.0, description="the steps' forward passes, prefill included")
    prefill_s: float = Field(0.0, ge=0.0, description="of forward_s: the prompt's prefill")
    stalled_s: float = Field(0.0, ge=0.0, description="of wall_s: the request stood still while other prompts were prefilled")


class KnowledgeRecord(Message):
    """Generated knowledge, keyed by entity on the knowledge topic; deduplicate by request_id."""

    request_id: Id
    entity_kind: EntityKind
    entity_id: Id
    segment: Id | None = None
    text: Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS * 4)]  # may be empty if the model stops at once
    token_count: int = Field(ge=0)
    mode: Mode
    model: Id
    stats: DecodeStats
    worker: Id
    prompt_version: Id | None = None  # the request's
    pool_version: int | None = Field(None, ge=0)  # the version of the segment's pool it drafted from (None: no pool held)
    created_at: float = Field(default_factory=time.time)


class PoolText(Message):
    text_id: Id
    text: Text


class PoolUpdate(Message):
    """A change to one shard of a segment's retrieval pool, keyed by segment on the pools topic.

    A segment's pool is the union of its shards: each pool-builder partition (`shard`: the user-events
    partition whose users wrote its texts) keeps its own part, so builders that split the users never
    write the same pool. `snapshot` replaces the shard; `delta` adds and removes. Large snapshots are
    split into chunks (chunk i of n, same version); a consumer applies a snapshot once all chunks arrived.
    """

    segment: Id
    shard: int = Field(0, ge=0)
    version: int = Field(ge=0)  # of this shard
    kind: Literal["snapshot", "delta"]
    added: list[PoolText] = Field(default_factory=list, max_length=MAX_POOL_TEXTS_PER_MESSAGE)
    removed: list[Id] = Field(default_factory=list, max_length=10 * MAX_POOL_TEXTS_PER_MESSAGE)
    chunk: int = Field(0, ge=0)
    chunks: int = Field(1, ge=1)
    created_at: float = Field(default_factory=time.time)


class SegmentAssignment(Message):
    """Which segment an entity belongs to (pool builder → workers)."""

    entity_kind: EntityKind
    entity_id: Id
    segment: Id
    version: int = Field(ge=0)


class Centroids(Message):
    """The segments' centroids, shared by every pool-builder member: one chunk of rows (float32, row-major,
    base64) of version `version`, keyed by chunk number on the centroids topic (readers keep the latest complete
    fit, so the topic may be compacted; `ensure_topics` creates it plain). One member (the owner
    of user-events partition 0) fits them; every member assigns its users with the latest complete version."""

    version: int = Field(ge=1)
    fit_id: Id  # tells two fits of one version apart (a member that lost partition 0 but has not noticed yet)
    segments: int = Field(ge=1)
    dim: int = Field(ge=1)
    chunk: int = Field(ge=0)
    chunks: int = Field(ge=1)
    first_row: int = Field(ge=0)
    rows_b64: Annotated[str, StringConstraints(min_length=1, max_length=700_000)]
    fitted_on: int = Field(ge=0, description="users the fit saw")
    created_at: float = Field(default_factory=time.time)


class DeadLetter(Message):
    """A message that could not be handled, with why, and the original bytes (base64)."""

    reason: Annotated[str, StringConstraints(min_length=1, max_length=4000)]
    error_type: Id
    source_topic: Id
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)
    key_b64: str | None = None
    value_b64: str
    service: Id
    failed_at: float = Field(default_factory=time.time)


ALL_MESSAGES: dict[str, type[Message]] = {
    cls.__name__: cls
    for cls in (UserEvent, ItemEvent, PromptRequest, KnowledgeRecord, PoolUpdate, SegmentAssignment, Centroids, DeadLetter)
}
