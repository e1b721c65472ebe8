"""The load bench: seeded Poisson arrivals, its figures, and one small run through a real broker and a
real worker process (every prompt answered exactly once, produced on its schedule)."""

import itertools
import statistics

import pytest

from dare.benchmarks.load import (
    LoadBenchError,
    Sent,
    arrivals,
    parse_methods,
    percentile,
    point_figures,
    point_name,
    point_trace,
    requests_for,
    run_load_bench,
    worker_groups,
)
from dare.benchmarks.workload import BenchPrompt
from schemas import DecodeStats, KnowledgeRecord


def test_arrivals_are_a_seeded_poisson_process_at_exactly_the_offered_rate():
    times = arrivals(2000, 4.0, seed=7)
    assert times == arrivals(2000, 4.0, seed=7) and times != arrivals(2000, 4.0, seed=8)
    assert times[0] == 0.0 and all(b >= a for a, b in itertools.pairwise(times))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.01)  # exponential gaps of mean 1/rate, the sum held
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.12)  # ... whose spread equals their mean
    short = [arrivals(60, 2.0, seed=s)[-1] for s in range(20)]  # a short point offers its rate, whatever the draw
    assert all(26.0 < t < 30.0 for t in short)  # (n+1)-th arrival at 30 s; free gaps spread it over ±4 s
    faster = arrivals(60, 2.02, seed=3)  # another rate, the same draw: the same arrivals, rescaled
    assert faster == pytest.approx([t * 2.0 / 2.02 for t in arrivals(60, 2.0, seed=3)])
    assert arrivals(5, None, seed=1) == [0.0] * 5  # a backlog: all at once
    with pytest.raises(ValueError):
        arrivals(3, 0.0, seed=1)


def test_percentiles_interpolate_between_ranks():
    assert percentile([], 50) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)


def test_methods_are_checked_and_grouped_by_the_worker_that_serves_them():
    assert parse_methods("dare-ar, dare-relaxed") == ["dare-ar", "dare-relaxed"]
    with pytest.raises(LoadBenchError, match="unknown method 'hf-generate'"):
        parse_methods("dare-ar,hf-generate")
    methods = ["dare-ar", "vllm-greedy", "vllm-dare-relaxed", "dare-relaxed", "vllm-dare-strict"]
    assert worker_groups(methods) == {"transformers": ["dare-ar", "dare-relaxed"], "vllm:greedy": ["vllm-greedy"],
                                      "vllm:dare": ["vllm-dare-relaxed", "vllm-dare-strict"]}
    assert [point_name(m) for m in ("dare-ar", "vllm-suffix", "vllm-dare-relaxed")] == [
        ("transformers", "dare-ar"), ("vllm", "vllm-suffix"), ("vllm", "dare-relaxed")]


def test_requests_cycle_the_prompts_with_fresh_ids():
    prompts = [BenchPrompt("user-1", "u-0", "p1"), BenchPrompt("item-7", "g-x", "p2"), BenchPrompt("odd", "g-x", "p3")]
    reqs = requests_for(prompts, 7, "relaxed", 16, "t", seed=3)
    assert [r.request_id for r in reqs] == [f"t-{i}" for i in range(7)]
    assert sorted(r.prompt for r in reqs[:3]) == ["p1", "p2", "p3"]  # every prompt once per cycle
    assert {(r.entity_kind, r.entity_id) for r in reqs} == {("user", "1"), ("item", "7"), ("item", "odd")}
    assert all(r.mode == "relaxed" and r.max_new_tokens == 16 for r in reqs)


def record(request_id, tokens=10, wall_s=1.0, steps=5, prefill_s=0.0, stalled_s=0.0):
    return KnowledgeRecord(request_id=request_id, entity_kind="user", entity_id="1", text="x", token_count=tokens, mode="ar",
                           model="m", worker="w", stats=DecodeStats(steps=steps, new_tokens=tokens, mean_accepted=2.0, wall_s=wall_s,
                                                                    prefill_s=prefill_s, stalled_s=stalled_s))


def test_point_figures_count_lost_prompts_and_leave_the_warm_up_out():
    reqs = requests_for([BenchPrompt("user-1", "s", "p")], 20, "ar", 10, "t", seed=0)
    sent = [Sent(r, 100.0 + i, 0.0) for i, r in enumerate(reqs)]
    # the first two (warm-up: a tenth) answered slowly, the rest after 3 s; the last one never
    arrived = {r.request_id: (100.0 + i + (50.0 if i < 2 else 3.0), record(r.request_id)) for i, r in enumerate(reqs[:-1])}
    p = point_figures("dare-ar", sent, arrived, 1, {"dare_worker_steps_total": 10, "dare_worker_step_rows_total": 20},
                      {"dare_worker_steps_total": 30, "dare_worker_step_rows_total": 80})
    assert (p["prompts"], p["answered"], p["lost"], p["duplicates"]) == (20, 19, 1, 1)
    assert p["latency_p50_s"] == p["latency_p99_s"] == pytest.approx(3.0)  # warm-up excluded
    assert p["queue_p50_s"] == pytest.approx(2.0) and p["decode_p50_s"] == pytest.approx(1.0)
    assert p["tokens_per_step"] == pytest.approx(2.0) and p["batch_occupancy"] == pytest.approx(3.0)
    assert p["achieved_tokens_per_s"] == pytest.approx(190 / (151 - 100))  # first sent to last answered (a slow warm-up one)
    assert p["prefill_share"] is None  # the worker counted no prefill


def test_a_point_says_how_much_of_the_decode_went_to_prefills_and_traces_every_prompt():
    reqs = requests_for([BenchPrompt("user-1", "s", "a prompt")], 10, "ar", 10, "t", seed=0)
    sent = [Sent(r, 100.0 + i, 0.0) for i, r in enumerate(reqs)]
    # decode 2 s each: 0.2 s its own prefill, 0.6 s standing still for the others'; the last one lost
    arrived = {r.request_id: (100.0 + i + 2.5, record(r.request_id, wall_s=2.0, prefill_s=0.2, stalled_s=0.6))
               for i, r in enumerate(reqs[:-1])}
    assert point_figures("dare-ar", sent, arrived, 0, {}, {})["prefill_share"] == pytest.approx(0.4)
    trace = point_trace(list(reversed(sent)), arrived)  # in order of production, whatever order they were kept in
    assert [t["request_id"] for t in trace] == [r.request_id for r in reqs]
    assert [t["warmup"] for t in trace] == [True] + [False] * 9 and [t["answered"] for t in trace] == [True] * 9 + [False]
    assert trace[3]["sent_s"] == pytest.approx(3.0) and trace[3]["prompt_chars"] == len("a prompt")
    assert trace[3]["latency_s"] == pytest.approx(2.5) and trace[3]["queue_s"] == pytest.approx(0.5)
    assert (trace[3]["decode_s"], trace[3]["prefill_s"], trace[3]["stalled_s"]) == (2.0, 0.2, 0.6)
    assert "latency_s" not in trace[-1]


@pytest.mark.integration
@pytest.mark.model
def test_a_small_load_run_answers_every_prompt_once_on_schedule(kafka_settings, lm, model_cache):
    from dare.benchmarks.workload import POOL_PATH, default_prompts, read_pool
    from dare.pipeline import pipeline

    settings = kafka_settings.model_copy(update={"cache_dir": model_cache, "threads": 2})
    traced = []
    with pipeline(settings, "load-test", timeout_s=300) as run:
        report = run_load_bench(run, default_prompts()[:4], read_pool(POOL_PATH), ["dare-ar", "dare-relaxed"], [1.5], None,
                                per_point=6, batch=4, max_new=6, seed=1, threads=2, trace=traced.append)
    points = report["points"]
    assert all(p["backend"] == "transformers" for p in points)
    assert {(p["method"], p["load_fraction"]) for p in points} == {(m, f) for m in ("dare-ar", "dare-relaxed") for f in (None, 1.5)}
    assert all(p["answered"] == 6 and p["lost"] == 0 and p["duplicates"] == 0 for p in points)
    rated = [p for p in points if p["load_fraction"]]
    assert all(p["offered_prompts_per_s"] == pytest.approx(1.5 * report["ar_saturation_prompts_per_s"]) for p in rated)
    assert report["rates_saturation_prompts_per_s"] == pytest.approx(report["ar_saturation_prompts_per_s"])
    # produced on the seeded schedule, never before a prompt's arrival time; how late is the machine's figure, not a verdict
    assert all(p["schedule_late_max_s"] >= 0 for p in points)
    assert all(p["latency_p50_s"] > 0 and p["batch_occupancy"] >= 1 for p in points)
    assert next(p for p in points if p["method"] == "dare-relaxed")["tokens_per_step"] >= 1.0
    # every prompt of every point traced once, answered, with the worker's own prefill counted
    assert len(traced) == 4 * 6 and len({t["request_id"] for t in traced}) == 24
    assert all(t["answered"] and t["prefill_s"] > 0 and t["decode_s"] >= t["prefill_s"] + t["stalled_s"] for t in traced)


def test_reports_from_two_environments_merge_into_one_table():
    from dare.benchmarks.load import format_table, merge_reports

    def report(methods, rate, p50, **settings):
        points = [{"bench_method": m, "method": m, "backend": "transformers", "offered_prompts_per_s": r, "load_fraction": None,
                   "latency_p50_s": p50, "latency_p90_s": p50, "latency_p99_s": p50, "queue_p50_s": 0.1, "decode_p50_s": p50,
                   "achieved_tokens_per_s": 50.0, "tokens_per_step": None, "batch_occupancy": 2.0, "answered": 6, "lost": 0,
                   "duplicates": 0} for m in methods for r in (None, rate)]
        return {"prompts_per_point": 6, "batch": 4, "max_new_tokens": 8, "seed": 0, "repeat": 1, "methods": methods,
                "ar_saturation_prompts_per_s": 0.5, "latency_objective_s": 60.0, "points": points, **settings}

    merged = merge_reports([report(["dare-ar"], 0.25, 3.0), report(["vllm-greedy"], 0.25, 9.0)])
    assert merged["methods"] == ["dare-ar", "vllm-greedy"] and len(merged["points"]) == 4
    assert merged["highest_rate_within_objective"] == {"dare-ar": 0.25, "vllm-greedy": 0.25}
    assert "| vllm-greedy | backlog |" in format_table(merged)
    with pytest.raises(LoadBenchError, match="different max_new_tokens"):
        merge_reports([report(["dare-ar"], 0.25, 3.0), report(["vllm-greedy"], 0.25, 9.0) | {"max_new_tokens": 96}])
    with pytest.raises(LoadBenchError, match="--saturation 0.5"):  # loads taken of other rates: other arrivals
        merge_reports([report(["dare-ar"], 0.25, 3.0, rates_saturation_prompts_per_s=0.5),
                       report(["vllm-greedy"], 0.25, 9.0, rates_saturation_prompts_per_s=0.505)])
