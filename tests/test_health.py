"""/healthz, /readyz and /metrics on a service's metrics port; readiness of the worker and the pool builder as they
start, serve and stop; the worker's latency histograms moving in a real-broker run."""

import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import REGISTRY

from infra.broker import free_port
from infra.health import HEALTH, Health, serve


def get(port, path):
    """(status, body) of a GET on localhost."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_for(done, what, timeout_s=180):
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def health_port():
    """HEALTH (the process's, which the services update) served on a free port; starts not ready."""
    HEALTH.set_ready(False, "starting")
    HEALTH.beat()
    port = free_port()
    server = serve(port, host="127.0.0.1")
    yield port
    server.shutdown()


def test_the_endpoints_answer_what_the_health_says():
    health = Health(liveness_s=3600)
    port = free_port()
    server = serve(port, health, host="127.0.0.1")
    try:
        assert get(port, "/healthz") == (200, "live\n")
        assert get(port, "/readyz") == (503, "not ready: starting\n")
        health.set_ready(False, "joining the consumer group")
        assert get(port, "/readyz") == (503, "not ready: joining the consumer group\n")
        health.set_ready(True)
        assert get(port, "/readyz") == (200, "ready\n")
        health.liveness_s = -1.0  # the loop has not turned since: stalled
        status, body = get(port, "/healthz")
        assert status == 503 and body.startswith("stalled")
        status, body = get(port, "/metrics")
        assert status == 200 and "# TYPE" in body
        assert get(port, "/nothing")[0] == 404
    finally:
        server.shutdown()


def sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.integration
@pytest.mark.model
def test_the_worker_is_ready_only_once_it_holds_its_pools_and_its_histograms_move(kafka_settings, lm, health_port):
    from dare.data import load_movielens, prompt_request
    from infra.kafka import ensure_topics, make_producer
    from schemas import PoolText, PoolUpdate, Topics, encode
    from workers.service import Worker

    settings = kafka_settings.model_copy(update={"max_new_tokens": 12})
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.all())
    producer = make_producer(settings, "test")
    producer.send(topics.pools, key=b"g-Animation",
                  value=encode(PoolUpdate(segment="g-Animation", version=1, kind="snapshot", added=[PoolText(text_id="t", text="A toy film.")])))
    producer.flush()
    worker = Worker(settings, lm)
    assert get(health_port, "/readyz")[0] == 503  # constructed: no group joined, no pool loaded
    before = {m: sample("dare_worker_latency_seconds_count", mode=m) for m in ("ar", "strict")}
    tokens_before = sample("dare_worker_tokens_per_entity_sum", mode="strict", entity_kind="item")
    stop = threading.Event()
    ready_seen_with_pools = []
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        def ready():
            status = get(health_port, "/readyz")[0]
            if status == 200:  # the moment it says ready, its partitions' pools are in
                ready_seen_with_pools.append("g-Animation" in worker.pools.pools)
            return status == 200

        wait_for(ready, "the worker to be ready")
        assert ready_seen_with_pools[0] and worker.ready.is_set()
        assert get(health_port, "/healthz")[0] == 200
        ml = load_movielens()
        for n, mode in enumerate(("ar", "strict")):
            request = prompt_request(ml, "item", "1", request_id=f"h{n}", mode=mode, segment="g-Animation")
            producer.send(topics.prompts, key=b"g-Animation", value=encode(request))
        producer.flush()
        wait_for(lambda: worker.stats.prompts == 2, "two prompts answered")
    finally:
        stop.set()
        thread.join(60)
    assert get(health_port, "/readyz") == (503, "not ready: stopped\n")
    for mode in ("ar", "strict"):
        assert sample("dare_worker_latency_seconds_count", mode=mode) == before[mode] + 1
        assert sample("dare_worker_latency_seconds_sum", mode=mode) > 0
        assert sample("dare_worker_decode_seconds_count", mode=mode) >= 1 and sample("dare_worker_queue_seconds_count", mode=mode) >= 1
    assert tokens_before < sample("dare_worker_tokens_per_entity_sum", mode="strict", entity_kind="item") <= tokens_before + 12
    drafted, accepted = ({s.labels["source"]: s.value for f in REGISTRY.collect() if f.name == name for s in f.samples
                          if s.name == name + "_total" and s.labels["rule"] == "strict"}
                         for name in ("dare_worker_draft_tokens", "dare_worker_draft_tokens_accepted"))
    assert drafted and set(drafted) <= {"segment", "global", "own"} and all(accepted.get(k, 0) <= n for k, n in drafted.items())
    status, metrics = get(health_port, "/metrics")
    assert status == 200 and 'dare_worker_latency_seconds_bucket{le="0.1",mode="strict"}' in metrics


@pytest.mark.integration
def test_the_pool_builder_is_ready_only_once_its_partitions_caught_up(kafka_settings, tmp_path, health_port):
    from dare.data import item_events, load_movielens, user_events
    from infra.kafka import produce
    from pool_builder.service import PoolBuilderService
    from schemas import Topics
    from tests.test_pool_builder import HashEncoder

    settings = kafka_settings
    topics = Topics(settings.topic_prefix)
    ml = load_movielens()
    produce(settings, topics.item_events, list(item_events(ml)))
    produce(settings, topics.user_events, user_events(ml, limit=20_000))  # a backlog to catch up with at start
    service = PoolBuilderService(settings, tmp_path, segments=4, pool_cap=8, encoder=HashEncoder())
    assert get(health_port, "/readyz")[0] == 503
    stop = threading.Event()
    thread = threading.Thread(target=service.run, args=(stop,), daemon=True)
    thread.start()
    applied_when_ready, reasons = [], set()
    try:
        def ready():
            status, body = get(health_port, "/readyz")
            if status == 200:
                applied_when_ready.append(service.counters.user_events)
            else:
                reasons.add(body.split(":", 1)[1].strip().split(" (")[0])
            return status == 200

        wait_for(ready, "the pool builder to be ready")
        assert applied_when_ready[0] == 20_000  # ready only with the whole backlog applied
        assert sample("dare_pool_builder_ready") == 1
        produce(settings, topics.user_events, list(user_events(ml, limit=20_100))[20_000:])
        wait_for(lambda: service.counters.user_events == 20_100, "new events applied")
        assert get(health_port, "/readyz")[0] == 200  # new events while ready: still ready
    finally:
        stop.set()
        thread.join(60)
    assert reasons and all(r.startswith(("starting", "no partitions held", "catching up with the inputs")) for r in reasons), reasons
    assert get(health_port, "/readyz") == (503, "not ready: stopped\n") and sample("dare_pool_builder_ready") == 0
