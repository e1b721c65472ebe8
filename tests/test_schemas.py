import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    ALL_MESSAGES,
    Centroids,
    DeadLetter,
    DecodeStats,
    ItemEvent,
    KnowledgeRecord,
    PoolText,
    PoolUpdate,
    PromptRequest,
    SchemaError,
    SegmentAssignment,
    Topics,
    UserEvent,
    decode,
    encode,
    export_json_schemas,
)
from schemas.messages import MAX_PROMPT_CHARS, MAX_TEXT_CHARS

EXAMPLES = [
    UserEvent(event_id="e1", user_id="1", item_id="242", rating=3.0, timestamp=881250949, age=24, gender="M", occupation="technician"),
    ItemEvent(event_id="i1", item_id="1", title="Toy Story", year=1995, genres=["Animation", "Comedy"], timestamp=0),
    PromptRequest(request_id="r1", entity_kind="user", entity_id="1", prompt="Analyze this user.", mode="relaxed"),
    KnowledgeRecord(
        request_id="r1", entity_kind="user", entity_id="1", segment="s3", text="Likes dramas.", token_count=4, mode="strict",
        model="m", worker="w", stats=DecodeStats(steps=2, new_tokens=4, mean_accepted=2.0, wall_s=0.5),
    ),
    PoolUpdate(segment="s3", version=7, kind="delta", added=[PoolText(text_id="k1", text="Likes dramas.")], removed=["k0"]),
    SegmentAssignment(entity_kind="user", entity_id="1", segment="s3", version=2),
    Centroids(version=2, fit_id="f1", segments=8, dim=384, chunk=0, chunks=1, first_row=0, rows_b64="AAAA", fitted_on=943),
    DeadLetter(reason="bad", error_type="schema", source_topic="p", partition=0, offset=5, value_b64="eA==", service="worker"),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    assert decode(type(message), encode(message)) == message


def test_every_message_type_has_an_example():
    assert {type(m).__name__ for m in EXAMPLES} == set(ALL_MESSAGES)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_unknown_field_is_rejected(message):
    payload = json.loads(encode(message)) | {"surprise": 1}
    with pytest.raises(SchemaError, match="surprise"):
        decode(type(message), json.dumps(payload).encode())


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_wrong_schema_version_is_rejected(message):
    payload = json.loads(encode(message)) | {"schema_version": 99}
    with pytest.raises(SchemaError, match="schema_version"):
        decode(type(message), json.dumps(payload).encode())


@pytest.mark.parametrize(
    "change, field",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   \n"}, "prompt"),
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
        ({"entity_id": 5}, "entity_id"),  # strict: no number for a string
        ({"max_new_tokens": "64"}, "max_new_tokens"),  # strict: no string for a number
        ({"mode": "turbo"}, "mode"),
        ({"entity_kind": "shop"}, "entity_kind"),
    ],
)
def test_bad_prompt_fields_are_rejected_with_the_field_named(change, field):
    payload = json.loads(encode(EXAMPLES[2])) | change
    with pytest.raises(SchemaError) as err:
        decode(PromptRequest, json.dumps(payload).encode())
    assert field in err.value.reason
    assert err.value.error_type == "schema"


def test_oversized_pool_text_is_rejected():
    with pytest.raises(ValueError):
        PoolText(text_id="k", text="y" * (MAX_TEXT_CHARS + 1))


@pytest.mark.parametrize(
    "data, error_type",
    [(b"\xff\xfe\x00", "undecodable"), (b"{not json", "json"), (b"[1, 2]", "schema"), (None, "empty")],
)
def test_garbage_bytes_raise_schema_error(data, error_type):
    with pytest.raises(SchemaError) as err:
        decode(PromptRequest, data)
    assert err.value.error_type == error_type


@settings(max_examples=200, deadline=None)
@given(
    request_id=st.text(min_size=1, max_size=128).filter(str.strip),
    prompt=st.text(min_size=1, max_size=2000).filter(str.strip),
    max_new=st.one_of(st.none(), st.integers(1, 4096)),
)
def test_prompt_round_trip_property(request_id, prompt, max_new):
    message = PromptRequest(request_id=request_id, entity_kind="item", entity_id="9", prompt=prompt, max_new_tokens=max_new)
    assert decode(PromptRequest, encode(message)) == message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_decoder(data):
    try:
        decode(PromptRequest, data)
    except SchemaError as exc:
        assert exc.reason


def test_topics_share_one_prefix():
    topics = Topics("acme.")
    assert all(name.startswith("acme.") for name in topics.all())
    assert len(set(topics.all())) == len(topics.all())
    assert topics.prompts == "acme.prompts"


def test_json_schema_export(tmp_path):
    paths = export_json_schemas(tmp_path)
    assert {p.name for p in paths} == {f"{name}.schema.json" for name in ALL_MESSAGES}
    schema = json.loads((tmp_path / "PromptRequest.schema.json").read_text())
    assert schema["additionalProperties"] is False
    assert "prompt" in schema["required"]


def test_snapshot_chunks_assemble_once_all_arrived_in_any_order():
    from schemas import PoolReplica

    chunks = [PoolUpdate(segment="s", version=3, kind="snapshot", added=[PoolText(text_id=f"t{i}", text="x")], chunk=i, chunks=3)
              for i in range(3)]
    replica = PoolReplica()
    assert replica.apply(chunks[2]) is None
    assert replica.apply(chunks[0]) is None
    assert replica.apply(chunks[0]) is None  # a redelivered chunk counts once
    change = replica.apply(chunks[1])
    assert change is not None and change.snapshot and [t.text_id for t in change.added] == ["t0", "t1", "t2"]
    assert replica.staged == {} and replica.pools == {"s": {"t0": "x", "t1": "x", "t2": "x"}}


def test_a_snapshot_replaces_the_pool_and_a_delta_removes_then_adds():
    from schemas import PoolReplica

    replica = PoolReplica()
    replica.apply(PoolUpdate(segment="s", version=1, kind="delta", added=[PoolText(text_id="a", text="1"), PoolText(text_id="b", text="2")]))
    change = replica.apply(PoolUpdate(segment="s", version=2, kind="delta", removed=["a"], added=[PoolText(text_id="a", text="3")]))
    assert change is not None and not change.snapshot and replica.pools["s"] == {"a": "3", "b": "2"}
    change = replica.apply(PoolUpdate(segment="s", version=3, kind="snapshot", added=[PoolText(text_id="c", text="4")]))
    assert change is not None and sorted(change.removed) == ["a", "b"] and replica.pools["s"] == {"c": "4"}


def test_a_segments_pool_is_the_union_of_its_shards_and_a_snapshot_replaces_one_shard():
    from schemas import PoolReplica

    def texts(*ids):
        return [PoolText(text_id=i, text=i.upper()) for i in ids]

    replica = PoolReplica()
    replica.apply(PoolUpdate(segment="s", shard=0, version=4, kind="snapshot", added=texts("a", "b")))
    replica.apply(PoolUpdate(segment="s", shard=1, version=2, kind="snapshot", added=texts("c")))
    assert replica.pools["s"] == {"a": "A", "b": "B", "c": "C"} and replica.version("s") == 6
    change = replica.apply(PoolUpdate(segment="s", shard=1, version=3, kind="snapshot", added=texts("d")))
    assert change is not None and change.removed == ["c"] and replica.pools["s"] == {"a": "A", "b": "B", "d": "D"}
    replica.apply(PoolUpdate(segment="s", shard=1, version=4, kind="delta", removed=["a"]))  # not shard 1's: kept
    assert set(replica.pools["s"]) == {"a", "b", "d"} and replica.version("s") == 8 and replica.version("t") is None
    replica.drop("s")
    assert replica.pools == {} and replica.shards == {} and replica.shard_versions == {} and replica.version("s") is None


def test_the_documented_example_lines_are_valid_messages_and_what_the_command_prints(capsys):
    import re
    from pathlib import Path

    from dare.cli import main
    from schemas import ALL_MESSAGES
    from schemas.examples import EXAMPLES

    doc = (Path(__file__).parents[1] / "docs" / "design.md").read_text()
    shown = dict(re.findall(r"\*\*`(\w+)`\*\*[^\n]*\n\n```json\n(.+?)\n```", doc))
    assert set(shown) == set(EXAMPLES) == {"UserEvent", "ItemEvent", "PromptRequest", "KnowledgeRecord", "SegmentAssignment", "DeadLetter"}
    for name, line in shown.items():
        message = decode(ALL_MESSAGES[name], line.encode())  # valid against the schema
        assert encode(message) == encode(EXAMPLES[name]) == line.encode(), name
        assert main(["schemas", "example", name]) == 0
        assert capsys.readouterr().out == line + "\n"
    letter = EXAMPLES["DeadLetter"]
    import base64

    with pytest.raises(SchemaError, match=letter.reason.split(": ", 1)[1][:20]):  # the reason is what decoding its bytes says
        decode(ALL_MESSAGES["PromptRequest"], base64.b64decode(letter.value_b64))
