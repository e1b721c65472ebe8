"""The generator worker against a real broker: answers good prompts, dead-letters bad ones."""

import base64
import threading

import pytest

from dare.data import load_movielens, prompt_request
from infra.kafka import consume_all, ensure_topics, make_producer
from schemas import DeadLetter, KnowledgeRecord, PromptRequest, Topics, decode, encode
from workers.service import Worker

pytestmark = pytest.mark.integration


def test_worker_answers_good_prompts_and_dead_letters_bad_ones(kafka_settings, lm):
    settings = kafka_settings.model_copy(update={"max_new_tokens": 8})
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.all())
    ml = load_movielens()
    good = [prompt_request(ml, "item", str(i), request_id=f"r{i}") for i in (1, 2, 3)]
    bad = [
        b"\xff\x00 not utf-8",
        b'{"schema_version": 1, "request_id": "x"}',
        encode(PromptRequest(request_id="long", entity_kind="user", entity_id="1", prompt="9" * 30000)),
        encode(PromptRequest(request_id="turbo", entity_kind="user", entity_id="1", prompt="hi", mode="relaxed")),
    ]
    producer = make_producer(settings, "test")
    for message in [encode(good[0]), bad[0], encode(good[1]), bad[1], bad[2], encode(good[2]), bad[3]]:
        producer.send(topics.prompts, key=b"k", value=message)  # one key: one partition, this order
    producer.flush()

    stats = Worker(settings, lm).run(threading.Event(), max_prompts=7, idle_timeout_s=60)
    assert (stats.prompts, stats.dead_lettered) == (3, 4)

    knowledge = [decode(KnowledgeRecord, r.value) for r in consume_all(settings, topics.knowledge, timeout_s=5)]
    assert sorted(k.request_id for k in knowledge) == ["r1", "r2", "r3"]
    assert all(k.token_count > 0 and k.mode == "ar" and k.model == lm.model_id for k in knowledge)

    letters = [decode(DeadLetter, r.value) for r in consume_all(settings, topics.dead_letter, timeout_s=5)]
    assert [letter.error_type for letter in letters] == ["undecodable", "schema", "too_long", "unsupported_mode"]
    assert base64.b64decode(letters[0].value_b64) == bad[0]  # the original bytes, kept
    assert all(letter.source_topic == topics.prompts for letter in letters)
    assert "exceeds the model's context" in letters[2].reason
