"""`dare generate-all` on a slice of MovieLens-100k against the real test broker: an interrupted run
resumes without duplicates or gaps, one file never mixes modes, and a dead-lettered prompt is
reported instead of waited for."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dare.data import load_movielens, prompt_request
from dare.generate_all import GenerateError, check_prompts, default_output, run_generate_all, summary_path, write_summary

pytestmark = pytest.mark.integration

SLICE = ["--users", "3", "--items", "3", "--ratings", "5000", "--batch", "2", "--max-new-tokens", "6"]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_lost_counts_what_the_latest_run_never_got(tmp_path):
    out = tmp_path / "k.jsonl"

    def run(stamp, lost, interrupted=False):
        return {"stamp": stamp, "entities": 1, "tokens": 1, "wall_s": 1.0, "lost": lost, "interrupted": interrupted}

    assert write_summary(out, "ar", "m", [], run("1", 5))["lost"] == 5  # gave up with 5 prompts unanswered
    assert write_summary(out, "ar", "m", [], run("2", 0))["lost"] == 0  # the next run asked again and got them
    assert write_summary(out, "ar", "m", [], run("3", 4, interrupted=True))["lost"] == 0  # Ctrl-C: not waited for
    assert len(write_summary(out, "ar", "m", [], None)["runs"]) == 3


def test_one_file_holds_one_cut_off_templates_version_and_relaxed_guard(tmp_path):
    assert str(default_output("relaxed", "ml-100k", "short")) == "results/knowledge/ml-100k-short-relaxed.jsonl"
    assert str(default_output("relaxed", "ml-100k", "kar", 0.5)) == "results/knowledge/ml-100k-relaxed-top1-0.5.jsonl"
    assert str(default_output("ar", "ml-100k", "kar", 0.5)) == "results/knowledge/ml-100k-ar.jsonl"  # a guard of relaxed only
    out = tmp_path / "k.jsonl"
    out.write_text("")
    summary_path(out).write_text(json.dumps({"mode": "relaxed", "as_of": 100, "prompt_version": "short-1"}))  # before guards
    check_prompts(out, 100, "short-1", 1.0)  # the same: no error
    with pytest.raises(GenerateError, match="as of 100; this run asks for 200"):
        check_prompts(out, 200, "short-1", 1.0)
    with pytest.raises(GenerateError, match="templates short-1; this run's are kar-2"):
        check_prompts(out, 100, "kar-2", 1.0)
    with pytest.raises(GenerateError, match="--relaxed-max-top1 1.0; this run asks for 0.5"):
        check_prompts(out, 100, "short-1", 0.5)


def test_an_interrupted_run_resumes_without_duplicates_or_gaps(kafka_settings, model_cache, lm, tmp_path):
    out = tmp_path / "ml-100k-relaxed.jsonl"
    env = dict(os.environ, DARE_CACHE_DIR=str(model_cache), PYTHONUNBUFFERED="1", DARE_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "dare.cli", "generate-all", "--mode", "relaxed", "--out", str(out), *SLICE,
                              "--bootstrap-servers", kafka_settings.bootstrap_servers, "--topic-prefix", kafka_settings.topic_prefix],
                             cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(lines(out)) < 1:
        assert first.poll() is None and time.monotonic() < deadline, "the first run wrote nothing"
        time.sleep(0.5)
    first.send_signal(signal.SIGINT)  # mid-run, as a user's Ctrl-C
    assert first.wait(60) == 130
    interrupted = lines(out)
    assert 1 <= len(interrupted) < 6

    settings = kafka_settings.model_copy(update={"max_new_tokens": 6, "cache_dir": model_cache, "threads": 1})
    summary = run_generate_all(settings, "relaxed", out, batch=2, users=3, items=3, ratings=5000, stall_s=300)
    records = lines(out)
    entities = [(r["entity_kind"], r["entity_id"]) for r in records]
    assert sorted(entities) == sorted([("user", u) for u in ("1", "2", "3")] + [("item", i) for i in ("1", "2", "3")])
    assert records[: len(interrupted)] == interrupted  # what the first run wrote is kept as it was
    assert all(r["mode"] == "relaxed" and r["model"] == lm.model_id and r["token_count"] > 0 for r in records)
    assert summary["entities"] == 6 and summary["lost"] == 0 and summary["dead_lettered"] == 0
    assert summary["tokens"] == sum(r["token_count"] for r in records) and summary["tokens_per_s"] > 0
    assert json.loads(summary_path(out).read_text())["runs"][-1]["entities"] == 6 - len(interrupted)

    again = run_generate_all(settings, "relaxed", out, users=3, items=3)  # nothing left: no pipeline, same file
    assert again["entities"] == 6 and lines(out) == records
    with pytest.raises(GenerateError, match="one file holds one mode and one model"):
        run_generate_all(settings, "ar", out, users=3, items=3)


def test_a_dead_lettered_prompt_is_reported_not_waited_for(kafka_settings, model_cache, lm, tmp_path):
    out = tmp_path / "ml-100k-ar.jsonl"
    ml = load_movielens()
    good = [prompt_request(ml, "item", i, request_id=f"dl-item-{i}", mode="ar", max_new_tokens=6) for i in ("1", "2")]
    too_long = good[0].model_copy(update={"request_id": "dl-long", "entity_id": "3", "prompt": "9" * 30000})
    settings = kafka_settings.model_copy(update={"max_new_tokens": 6, "cache_dir": model_cache, "threads": 1})
    summary = run_generate_all(settings, "ar", out, batch=2, ratings=5000, stall_s=300, requests=[*good, too_long])
    assert summary["dead_lettered"] == 1 and summary["entities"] == 2
    assert summary["runs"][-1]["dead_lettered"]["dl-long"].startswith("too_long")
    assert sorted(r["entity_id"] for r in lines(out)) == ["1", "2"]


def test_a_catalogue_of_ones_own_in_recbole_atomic_files(kafka_settings, model_cache, lm, tmp_path, shop_files):
    """`dare generate-all --dataset DIR --templates DIR`: a synthetic shop's customers and products get knowledge
    from prompts written from their own columns, through the real pipeline (pool builder included)."""
    from dare.data import load_catalogue

    root, templates = shop_files
    out = tmp_path / "shop-ar.jsonl"
    env = dict(os.environ, DARE_CACHE_DIR=str(model_cache), PYTHONUNBUFFERED="1", DARE_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "dare.cli", "generate-all", "--mode", "ar", "--dataset", str(root),
                           "--templates", str(templates), "--out", str(out), "--users", "2", "--items", "2", "--batch", "4",
                           "--max-new-tokens", "4", "--bootstrap-servers", kafka_settings.bootstrap_servers,
                           "--topic-prefix", kafka_settings.topic_prefix],
                          check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = lines(out)
    assert sorted((r["entity_kind"], r["entity_id"]) for r in records) == [("item", "p0"), ("item", "p1"), ("user", "c0"), ("user", "c1")]
    assert all(r["request_id"].startswith("shop-ar-") and r["token_count"] > 0 for r in records)
    summary = json.loads(summary_path(out).read_text())
    assert summary["dataset"] == "shop" and summary["entities"] == 4 and summary["lost"] == 0
    shop = load_catalogue(root, templates)
    assert summary["as_of"] == shop.time_cut(0.8)  # prompts as of the CTR test's boundary
    assert summary["prompt_version"] == shop.templates.version and shop.templates.version.startswith("templates-")
    assert {r["prompt_version"] for r in records} == {shop.templates.version}  # each record says which templates wrote it
    assert "replayed shop: 12 item events, 180 rating events" in done.stdout
