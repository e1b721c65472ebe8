import json

import pytest

from dare.benchmarks.single import check_prompt_lengths, format_table, parse_methods, run_bench
from dare.benchmarks.workload import (
    POOL_PATH,
    SPEC_PATH,
    BenchPrompt,
    WorkloadError,
    check_segments,
    default_prompts,
    read_pool,
    read_prompts,
)
from dare.cli import main


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_file_errors_name_the_line(tmp_path):
    good = {"id": "a", "segment": "s", "prompt": "hi"}
    with pytest.raises(WorkloadError, match=r"p.jsonl:2: field 'prompt'"):
        read_prompts(write(tmp_path, "p.jsonl", [good, {"id": "b", "segment": "s"}]))
    with pytest.raises(WorkloadError, match=r"p.jsonl:3: not JSON"):
        read_prompts(write(tmp_path, "p.jsonl", [good, good, "{oops"]))
    with pytest.raises(WorkloadError, match=r"field 'prompt' missing, empty"):
        read_prompts(write(tmp_path, "p.jsonl", [good | {"prompt": "  "}]))
    with pytest.raises(WorkloadError, match="no such file"):
        read_prompts(tmp_path / "missing.jsonl")


def test_unknown_segment_names_the_prompt_line():
    prompts = [BenchPrompt("a", "s1", "x"), BenchPrompt("b", "nowhere", "y")]
    with pytest.raises(WorkloadError, match=r"prompts.jsonl:2: unknown segment 'nowhere'"):
        check_segments(prompts, {"s1": ["text"]}, "prompts.jsonl")


def test_unknown_methods_are_rejected_and_hf_generate_is_always_measured():
    assert parse_methods("dare-relaxed@global") == ["hf-generate", "dare-relaxed@global"]
    with pytest.raises(WorkloadError, match="unknown method"):
        parse_methods("hf-generate,turbo")
    with pytest.raises(WorkloadError, match="`ar` was renamed"):
        parse_methods("ar")
    with pytest.raises(WorkloadError, match="pool variant"):
        parse_methods("dare-ar@global")
    with pytest.raises(WorkloadError, match="pool variant"):
        parse_methods("rest@global")


def test_default_workload_files_agree():
    spec = json.loads(SPEC_PATH.read_text())
    pool = read_pool(POOL_PATH)
    assert set(pool) == set(spec["segments"])
    assert all(len(texts) == len(spec["segments"][s]["pool"]) for s, texts in pool.items())
    prompts = default_prompts()
    assert len(prompts) == sum(len(s["held_out"]) for s in spec["segments"].values())
    assert len({p.segment for p in prompts[: len(spec["segments"])]}) == len(spec["segments"])  # interleaved
    check_segments(prompts, pool, SPEC_PATH)


def test_over_long_prompt_names_the_line(lm):
    prompts = [BenchPrompt("ok", "s", "hi"), BenchPrompt("long", "s", "9" * 9000)]
    with pytest.raises(WorkloadError, match=r"f.jsonl:2: prompt 'long' has \d+ tokens"):
        check_prompt_lengths(lm, prompts, 128, "f.jsonl")


def test_bench_runs_every_method_and_strict_matches_greedy_on_smollm(lm, model_cache):
    prompts = [
        BenchPrompt("toy", "s1", "Introduce the movie Toy Story (1995) in two sentences."),
        BenchPrompt("heat", "s2", "Introduce the movie Heat (1995) in two sentences."),
    ]
    pools = {
        "s1": ["Toy Story is a 1995 American computer-animated comedy film directed by John Lasseter."],
        "s2": ["Heat is a 1995 American crime film written and directed by Michael Mann."],
    }
    methods = parse_methods("hf-generate,pld,rest,dare-ar,dare-strict,dare-relaxed,dare-strict@global,dare-relaxed@random")
    report = run_bench(lm, prompts, pools, methods, 24, model_cache)
    assert set(report["methods"]) == set(methods)
    for prompt in report["prompts"]:
        outputs = prompt["outputs"]
        greedy = outputs["hf-generate"]
        assert outputs["dare-ar"]["token_ids"] == greedy["token_ids"]  # the engine's greedy is greedy
        assert outputs["dare-strict"]["token_ids"] == greedy["token_ids"]  # lossless
        assert outputs["dare-strict@global"]["token_ids"] == greedy["token_ids"]
        assert outputs["rest"]["token_ids"] == greedy["token_ids"]
        assert outputs["dare-strict"]["steps"] <= outputs["dare-ar"]["steps"]
    for m in report["methods"].values():
        assert m["tokens_per_s"] > 0 and m["mean_accepted"] >= 1.0
    assert "| dare-relaxed |" in format_table(report)


def test_bench_command_reports_a_bad_file_in_one_line(tmp_path, capsys):
    prompts = write(tmp_path, "p.jsonl", [{"id": "a", "segment": "zz", "prompt": "hi"}])
    pool = write(tmp_path, "pool.jsonl", [{"segment": "s1", "text": "hello"}])
    assert main(["bench", "--prompts", str(prompts), "--pool", str(pool)]) == 1
    assert "p.jsonl:1: unknown segment 'zz'" in capsys.readouterr().err


def test_batched_bench_strict_rows_match_greedy_on_smollm(lm, model_cache):
    from dare.benchmarks.batch import format_batch_table, run_batch_bench

    prompts = [
        BenchPrompt("toy", "s1", "Introduce the movie Toy Story (1995) in two sentences."),
        BenchPrompt("heat", "s2", "Introduce the movie Heat (1995) in two sentences."),
        BenchPrompt("fargo", "s2", "Introduce the movie Fargo (1996) in one sentence."),
    ]
    pools = {
        "s1": ["Toy Story is a 1995 American computer-animated comedy film directed by John Lasseter."],
        "s2": ["Heat is a 1995 American crime film written and directed by Michael Mann."],
    }
    report = run_batch_bench(lm, prompts, pools, sizes=(2, 3), max_new=20, cache_dir=model_cache, hf_sizes=(1, 2, 8), repeat=2)
    runs = {(r["method"], r["batch"]): r for r in report["runs"]}
    assert set(runs) == {("hf-generate", 1), ("hf-generate", 2), ("hf-generate", 3),
                         *((f"dare-{m}", b) for m in ("ar", "strict", "relaxed") for b in (2, 3))}
    for b in (2, 3):  # batched, rows joining as others finish: still greedy
        assert runs[("dare-strict", b)]["equal_to_greedy"] == runs[("dare-ar", b)]["equal_to_greedy"] == 3
    assert len(runs[("hf-generate", 1)]["samples"]) == 1
    assert all(len(r["samples"]) == 2 for k, r in runs.items() if k != ("hf-generate", 1))
    assert report["best"]["hf-generate"]["batch"] in (1, 2, 3)
    assert set(report["best"]) == {"hf-generate", "dare-ar", "dare-strict", "dare-relaxed"}
    assert all(r["tokens_per_s"] > 0 for r in report["runs"]) and runs[("dare-relaxed", 2)]["mean_accepted"] >= 1.0
    assert "| dare-relaxed | 2 |" in format_batch_table(report) and "best of each: hf-generate " in format_batch_table(report)


def test_vllm_bench_methods_are_checked():
    from dare.benchmarks.vllm import HF_METHOD, VLLM_METHODS, available_methods

    assert available_methods("vllm-greedy, dare-relaxed") == ["vllm-greedy", "dare-relaxed"]
    assert set(available_methods()) <= {*VLLM_METHODS, HF_METHOD} and "dare-relaxed" in available_methods()
    with pytest.raises(WorkloadError, match="unknown method.*fast.*choose from"):
        available_methods("vllm-greedy,fast")


def test_vllm_table_ratios_only_beside_vllm_greedy():
    from dare.benchmarks.vllm import format_vllm_table

    row = {"batch1_tokens_per_s": 50.0, "backlog_tokens_per_s": 90.0, "mean_accepted": 4.0}
    report = {"model": "m", "device": "cpu", "prompts": 2, "max_new_tokens": 8, "repeat": 1,
              "methods": {"dare-relaxed": row}}
    assert "| dare-relaxed | 50.0 | — | 90.0 | — | 4.00 | — |" in format_vllm_table(report)
    report["methods"]["vllm-greedy"] = {"batch1_tokens_per_s": 25.0, "backlog_tokens_per_s": 100.0, "mean_accepted": 1.0}
    assert "| dare-relaxed | 50.0 | 2.00x | 90.0 | 0.90x | 4.00 | — |" in format_vllm_table(report)
