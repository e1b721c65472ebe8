"""One example of each message a user produces or consumes, built from the schemas (so it is valid by construction):
`dare schemas example TYPE` prints it; docs/design.md shows them, and a test checks the two agree."""

from __future__ import annotations

import base64

from schemas.codec import SchemaError, decode
from schemas.messages import (
    DeadLetter,
    DecodeStats,
    ItemEvent,
    KnowledgeRecord,
    Message,
    PromptRequest,
    SegmentAssignment,
    UserEvent,
)

AT = 1764892800.0  # 2025-12-05 00:00 UTC: a fixed time, so the examples do not change between runs

_PROMPT = PromptRequest(request_id="ml-item-1-0", entity_kind="item", entity_id="1", segment="g-Animation", mode="strict",
                        prompt="Introduce the movie Toy Story (1995), genres Animation, Children's, Comedy, in a few sentences.",
                        max_new_tokens=128, prompt_version="kar-1a2b3c4d", created_at=AT)

_BAD = _PROMPT.model_dump_json().replace('"strict"', '"fast"').encode()  # a prompt asking for a mode that does not exist


def _reason(data: bytes) -> SchemaError:
    try:
        decode(PromptRequest, data)
    except SchemaError as exc:
        return exc
    raise AssertionError("the bad example decoded")


EXAMPLES: dict[str, Message] = {
    "UserEvent": UserEvent(event_id="ml100k-r0", user_id="196", item_id="242", rating=3.0, timestamp=881250949, age=49,
                           gender="M", occupation="writer"),
    "ItemEvent": ItemEvent(event_id="ml100k-i1", item_id="1", title="Toy Story", year=1995, genres=["Animation", "Children's", "Comedy"],
                           timestamp=788918400),
    "PromptRequest": _PROMPT,
    "KnowledgeRecord": KnowledgeRecord(
        request_id="ml-item-1-0", entity_kind="item", entity_id="1", segment="g-Animation",
        text="Toy Story (1995) is a computer-animated comedy about a cowboy doll who feels threatened by a new space toy.",
        token_count=27, mode="strict", model="SmolLM2-135M-Instruct",
        stats=DecodeStats(steps=9, new_tokens=27, mean_accepted=3.0, wall_s=0.61, retrieval_s=0.01, forward_s=0.55, prefill_s=0.12),
        worker="worker-host-4242", prompt_version="kar-1a2b3c4d", pool_version=7, created_at=AT + 1.4),
    "SegmentAssignment": SegmentAssignment(entity_kind="user", entity_id="196", segment="u3", version=2),
    "DeadLetter": DeadLetter(reason=_reason(_BAD).reason, error_type=_reason(_BAD).error_type, source_topic="dare.prompts",
                             partition=0, offset=17, key_b64=base64.b64encode(b"1").decode(), value_b64=base64.b64encode(_BAD).decode(),
                             service="worker:worker-host-4242", failed_at=AT + 2.0),
}
