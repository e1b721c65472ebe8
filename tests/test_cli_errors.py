"""Every subcommand answers a broken environment with one clear line on stderr and a non-zero exit
code, never a traceback. Each case runs `dare` as a user would, in its own process; a new
subcommand must join the table (the last test fails until it does)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dare.cli import build_parser

UNREACHABLE = "127.0.0.1:1"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    (root / "a-file").write_text("not a directory\n")
    (root / "bad.jsonl").write_text(json.dumps({"schema_version": 1, "request_id": "r1", "entity_kind": "user",
                                                "entity_id": "1", "prompt": "hi"}) + "\n{not json\n")
    (root / "bad-pool.jsonl").write_text('{"segment": "s1"}\n')
    return root


# (case id, arguments, extra environment, text the message must name); {root} is the fixture's directory.
CASES = [
    ("config-bad-env", ["config"], {"DARE_MAX_NEW_TOKENS": "lots"}, "max_new_tokens"),
    ("config-out-of-range-env", ["config"], {"DARE_THREADS": "0"}, "threads"),
    ("schemas-unwritable-dir", ["schemas", "export", "{root}/a-file/schemas"], {}, "{root}/a-file"),
    ("broker-port-out-of-range", ["broker", "--port", "70000"], {}, "--port"),
    ("generate-unknown-item", ["generate", "--item", "99999"], {}, "99999"),
    ("generate-bad-model-dir", ["generate", "--prompt", "hi", "--model", "{root}/no-model"], {}, "{root}/no-model"),
    ("generate-zero-tokens", ["generate", "--prompt", "hi", "--max-new-tokens", "0"], {}, "--max-new-tokens"),
    ("worker-unreachable-broker", ["worker", "--bootstrap-servers", UNREACHABLE], {}, UNREACHABLE),
    ("worker-zero-batch", ["worker", "--batch", "0"], {}, "--batch"),
    ("consume-unreachable-broker", ["consume", "knowledge", "--bootstrap-servers", UNREACHABLE], {}, UNREACHABLE),
    ("consume-negative-max", ["consume", "knowledge", "--max", "-3"], {}, "--max"),
    ("produce-missing-file", ["produce", "file", "--file", "{root}/missing.jsonl", "--type", "PromptRequest",
                              "--bootstrap-servers", UNREACHABLE], {}, "{root}/missing.jsonl"),
    ("produce-directory-as-file", ["produce", "file", "--file", "{root}", "--type", "PromptRequest",
                                   "--bootstrap-servers", UNREACHABLE], {}, "{root}"),
    ("produce-malformed-jsonl", ["produce", "file", "--file", "{root}/bad.jsonl", "--type", "PromptRequest",
                                 "--bootstrap-servers", UNREACHABLE], {}, "{root}/bad.jsonl:2"),
    ("produce-unknown-type", ["produce", "file", "--file", "{root}/bad.jsonl", "--type", "Nope",
                              "--bootstrap-servers", UNREACHABLE], {}, "Nope"),
    ("produce-unreachable-broker", ["produce", "item-events", "--bootstrap-servers", UNREACHABLE], {}, UNREACHABLE),
    ("pool-builder-unreachable-broker", ["pool-builder", "--bootstrap-servers", UNREACHABLE], {}, UNREACHABLE),
    ("pool-builder-zero-segments", ["pool-builder", "--segments", "0"], {}, "--segments"),
    ("pool-builder-negative-neighbourhood", ["pool-builder", "--neighbourhood", "-1"], {}, "--neighbourhood"),
    ("bench-missing-prompts", ["bench", "--prompts", "{root}/missing.jsonl"], {}, "{root}/missing.jsonl"),
    ("bench-malformed-pool", ["bench", "--pool", "{root}/bad-pool.jsonl"], {}, "{root}/bad-pool.jsonl:1"),
    ("bench-unwritable-json", ["bench", "--json", "{root}/a-file/report.json"], {}, "{root}/a-file/report.json"),
    ("bench-zero-limit", ["bench", "--limit", "0"], {}, "--limit"),
    *[pytest.param(f"{command}-vllm-without-the-extra", [command, "--backend", "vllm"], {}, "make install-vllm",
                   id=f"{command}-vllm-without-the-extra",
                   marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here"))
      for command in ("bench", "worker")],
    ("load-bench-unknown-method", ["load-bench", "--methods", "dare-ar,nope"], {}, "nope"),
    ("load-bench-zero-load", ["load-bench", "--load", "0.5,0"], {}, "--load"),
    ("load-bench-missing-prompts", ["load-bench", "--prompts", "{root}/missing.jsonl"], {}, "{root}/missing.jsonl"),
    ("load-bench-unwritable-plot", ["load-bench", "--plot", "{root}/a-file/load.png"], {}, "{root}/a-file/load.png"),
    ("load-bench-merge-missing-report", ["load-bench", "--merge", "{root}/missing.json"], {}, "{root}/missing.json"),
    ("workload-zero-segments", ["workload", "make", "--segments", "0"], {}, "--segments"),
    ("generate-all-unwritable-out", ["generate-all", "--out", "{root}/a-file/k.jsonl"], {}, "{root}/a-file/k.jsonl"),
    ("generate-all-zero-batch", ["generate-all", "--batch", "0"], {}, "--batch"),
    ("generate-all-bad-as-of", ["generate-all", "--as-of", "yesterday"], {}, "--as-of"),
    ("generate-all-missing-catalogue", ["generate-all", "--dataset", "{root}/no-shop"], {}, "no no-shop.inter"),
    ("generate-all-missing-templates", ["generate-all", "--templates", "{root}/no-templates"], {}, "{root}/no-templates/user.txt"),
    ("data-synth-unwritable-out", ["data", "synth", "--out", "{root}/a-file/synthetic"], {}, "{root}/a-file/synthetic"),
    ("produce-missing-catalogue", ["produce", "user-events", "--dataset", "{root}/no-shop"], {}, "no no-shop.inter"),
    ("generate-all-unreachable-broker", ["generate-all", "--bootstrap-servers", UNREACHABLE], {}, UNREACHABLE),
    ("eval-missing-knowledge", ["eval", "quality", "--ar", "{root}/missing.jsonl"], {}, "{root}/missing.jsonl"),
    ("demo-unreachable-broker", ["demo", "--bootstrap-servers", UNREACHABLE], {}, UNREACHABLE),
    ("demo-unwritable-records", ["demo", "--records", "{root}/a-file/records.jsonl"], {}, "{root}/a-file/records.jsonl"),
    ("demo-zero-workers", ["demo", "--workers", "0"], {}, "--workers"),
]


def run_dare(args, env, cwd):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DARE_") or k == "DARE_CACHE_DIR"}  # conftest's
    environment |= {"DARE_BROKER_TIMEOUT_S": "1", "DARE_LOG_FORMAT": "json"} | env
    return subprocess.run([sys.executable, "-m", "dare.cli", *args], env=environment, cwd=cwd, capture_output=True,
                          text=True, timeout=120, check=False)


def _values(case):  # a plain tuple, or a pytest.param's values
    return getattr(case, "values", case)


@pytest.mark.parametrize("case, args, env, named", CASES, ids=[_values(c)[0] for c in CASES])
def test_broken_input_gets_one_clear_line(files, case, args, env, named):
    args = [a.format(root=files) for a in args]
    result = run_dare(args, env, files)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert named.format(root=files) in result.stderr, result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith(("dare", "usage:")) or "error:" in line]
    assert message, result.stderr


def test_debug_logging_still_shows_the_traceback(files):
    result = run_dare(["schemas", "export", f"{files}/a-file/schemas"], {"DARE_LOG_LEVEL": "debug"}, files)
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert any(line.startswith("dare schemas:") and f"{files}/a-file" in line for line in result.stderr.splitlines())


def test_produce_file_checks_the_whole_file_before_it_connects(files):
    """A bad second line: nothing is sent, and the broker is never asked (it is unreachable here)."""
    result = run_dare(["produce", "file", "--file", f"{files}/bad.jsonl", "--type", "PromptRequest",
                       "--bootstrap-servers", UNREACHABLE], {}, files)
    assert result.returncode == 1
    assert "no Kafka broker" not in result.stderr and "bad.jsonl:2" in result.stderr


def test_every_subcommand_is_in_the_table():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) == {_values(c)[1][0] for c in CASES}


def test_the_three_reported_cases_print_one_line(files):
    """The issue's three: a dead broker for consume, a missing file for produce, an unwritable export directory."""
    for args, named in ((["consume", "knowledge", "--bootstrap-servers", UNREACHABLE], UNREACHABLE),
                        (["produce", "file", "--file", "missing.jsonl", "--type", "PromptRequest"], "missing.jsonl"),
                        (["schemas", "export", f"{files}/a-file/dir"], f"{files}/a-file")):
        result = run_dare(args, {}, files)
        lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]  # JSON lines are logs
        assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"dare {args[0]}:") and named in lines[0], \
            result.stderr


@pytest.mark.integration
def test_a_sent_file_says_how_many_messages(kafka_settings, files):
    good = Path(files / "good.jsonl")
    good.write_text(files.joinpath("bad.jsonl").read_text().splitlines()[0] + "\n")
    result = run_dare(["produce", "file", "--file", str(good), "--type", "PromptRequest", "--bootstrap-servers",
                       kafka_settings.bootstrap_servers, "--topic-prefix", kafka_settings.topic_prefix], {}, files)
    assert result.returncode == 0 and "produced 1 messages" in result.stdout, result.stderr
