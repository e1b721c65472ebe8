"""The generator worker against a real broker: answers good prompts, dead-letters bad ones."""

import base64
import threading

import pytest
from prometheus_client import REGISTRY

from dare.benchmarks.reference import hf_generate
from dare.data import load_movielens, prompt_request
from infra.kafka import ensure_topics, make_producer
from infra.reader import read_topic
from schemas import DeadLetter, KnowledgeRecord, PoolText, PoolUpdate, PromptRequest, SegmentAssignment, Topics, decode, encode
from workers.engine import CostModel
from workers.engine.runtime.model import chat_input_ids
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
        b'{"schema_version": 1, "request_id": "turbo", "entity_kind": "user", "entity_id": "1", "prompt": "hi", "mode": "turbo"}',
    ]
    producer = make_producer(settings, "test")
    for message in [encode(good[0]), bad[0], encode(good[1]), bad[1], bad[2], encode(good[2]), bad[3]]:
        producer.send(topics.prompts, key=b"k", value=message)  # one key: one partition, this order
    producer.flush()

    stats = Worker(settings, lm).run(threading.Event(), max_prompts=7, idle_timeout_s=60)
    assert (stats.prompts, stats.dead_lettered) == (3, 4)

    knowledge = [decode(KnowledgeRecord, r.value) for r in read_topic(settings, topics.knowledge, timeout_s=5)]
    assert sorted(k.request_id for k in knowledge) == ["r1", "r2", "r3"]
    assert all(k.token_count > 0 and k.mode == "ar" and k.model == lm.model_id for k in knowledge)

    letters = [decode(DeadLetter, r.value) for r in read_topic(settings, topics.dead_letter, timeout_s=5)]
    assert [letter.error_type for letter in letters] == ["undecodable", "schema", "too_long", "schema"]
    assert "mode" in letters[3].reason
    assert base64.b64decode(letters[0].value_b64) == bad[0]  # the original bytes, kept
    assert all(letter.source_topic == topics.prompts for letter in letters)
    assert "exceeds the model's context" in letters[2].reason


def test_worker_decodes_with_dare_using_pools_from_the_topic(kafka_settings, lm):
    settings = kafka_settings.model_copy(update={"max_new_tokens": 32})
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.all())
    ml = load_movielens()
    request = prompt_request(ml, "item", "1", request_id="dare-1", mode="strict")
    greedy = hf_generate(lm, chat_input_ids(lm.tokenizer, request.prompt), 32)
    producer = make_producer(settings, "test")
    # The pool builder's output: a segment pool holding a text close to the answer, and the assignment.
    snapshot = PoolUpdate(segment="g-Animation", version=1, kind="snapshot", added=[PoolText(text_id="item-2", text=greedy.text)])
    producer.send(topics.pools, key=b"g-Animation", value=encode(snapshot))
    producer.send(topics.assignments, key=b"1", value=encode(SegmentAssignment(entity_kind="item", entity_id="1", segment="g-Animation", version=0)))
    producer.send(topics.prompts, key=b"1", value=encode(request))
    producer.send(topics.prompts, key=b"1", value=encode(request.model_copy(update={"request_id": "dare-2", "mode": "relaxed"})))
    producer.flush()

    worker = Worker(settings, lm)
    # One CPU's measured curve, fixed (docs: SmolLM2-135M, 2 threads), in place of this machine's: the draft
    # budget, and so the steps and the speedup estimate below, are the code's, whatever CPU runs the test.
    worker.engine.cost = CostModel({1: 0.074, 8: 0.127, 16: 0.145, 32: 0.197, 64: 0.291}, "cpu")
    stats = worker.run(threading.Event(), max_prompts=2, idle_timeout_s=60)
    assert stats.prompts == 2
    records = {k.request_id: k for k in (decode(KnowledgeRecord, r.value) for r in read_topic(settings, topics.knowledge, timeout_s=5))}
    strict = records["dare-1"]
    assert strict.segment == "g-Animation" and strict.mode == "strict"
    assert strict.text == greedy.text  # lossless through the whole worker path
    assert strict.stats.mean_accepted > 2  # the pool text was drafted and accepted
    assert records["dare-2"].mode == "relaxed" and records["dare-2"].token_count > 0
    assert "item-1" in worker.pools.pools["g-Animation"].texts  # its own output joined the local pool
    assert REGISTRY.get_sample_value("dare_worker_consumer_lag") == 0  # the backlog is done
    assert REGISTRY.get_sample_value("dare_worker_speedup_estimate") > 1  # drafts from the pool were accepted


def test_batched_worker_answers_everything_greedy_rows_exact_and_commits_it_all(kafka_settings, lm):
    settings = kafka_settings.model_copy(update={"max_new_tokens": 16})
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.all())
    ml = load_movielens()
    requests = [prompt_request(ml, "item", str(i), request_id=f"b{i}", mode=("ar", "strict", "relaxed")[i % 3],
                               max_new_tokens=8 + 2 * i) for i in range(1, 8)]
    producer = make_producer(settings, "test")
    for n, request in enumerate(requests):
        producer.send(topics.prompts, key=b"k", value=encode(request))  # one partition: commits must wait for the oldest
        if n == 3:
            producer.send(topics.prompts, key=b"k", value=b"{broken")
    producer.flush()

    stats = Worker(settings, lm, batch=3).run(threading.Event(), max_prompts=8, idle_timeout_s=60)
    assert (stats.prompts, stats.dead_lettered) == (7, 1)
    records = {k.request_id: k for k in (decode(KnowledgeRecord, r.value) for r in read_topic(settings, topics.knowledge, timeout_s=5))}
    assert set(records) == {r.request_id for r in requests}
    for request in requests:
        if request.mode in ("ar", "strict"):  # greedy rows, decoded inside a batch, equal plain greedy
            greedy = hf_generate(lm, chat_input_ids(lm.tokenizer, request.prompt), request.max_new_tokens)
            assert records[request.request_id].text == greedy.text, request.request_id
    again = Worker(settings, lm, batch=3).run(threading.Event(), idle_timeout_s=4)
    assert (again.prompts, again.dead_lettered) == (0, 0)  # every offset was committed
