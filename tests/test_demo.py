"""`dare demo`: the whole pipeline as separate processes, and its clean exit on Ctrl-C."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dare.cli import main
from infra.broker import port_in_use


@pytest.mark.integration
def test_demo_end_to_end_agrees_with_dare_consume(kafka_settings, model_cache, lm, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DARE_CACHE_DIR", str(model_cache))
    summary_path, records_path = tmp_path / "summary.json", tmp_path / "knowledge.jsonl"
    argv = ["demo", "--limit", "2", "--ratings", "10000", "--max-new-tokens", "12", "--json", str(summary_path),
            "--records", str(records_path), "--bootstrap-servers", kafka_settings.bootstrap_servers,
            "--topic-prefix", kafka_settings.topic_prefix]
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(summary_path.read_text())
    assert summary["prompts"] == 4 and summary["knowledge_records"] == 4
    assert summary["lost"] == 0 and summary["duplicates"] == 0 and summary["dead_lettered"] == 0
    assert set(summary["modes"]) == {"ar", "relaxed"} and summary["speedup_vs_ar"] > 0
    assert "| prompts |" in out and "relaxed: 2/2 prompts" in out

    records = [json.loads(line) for line in records_path.read_text().splitlines()]
    assert sorted(r["request_id"] for r in records) == sorted({r["request_id"] for r in records}) and len(records) == 4
    assert main(["consume", "knowledge", "--json", "--timeout", "3", "--bootstrap-servers", kafka_settings.bootstrap_servers,
                 "--topic-prefix", kafka_settings.topic_prefix]) == 0
    consumed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert sorted(r["request_id"] for r in consumed) == sorted(r["request_id"] for r in records)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.integration
def test_interrupting_the_demo_leaves_no_process_behind(model_cache, lm, tmp_path):
    env = dict(os.environ, DARE_CACHE_DIR=str(model_cache), PYTHONUNBUFFERED="1")
    env.pop("DARE_BOOTSTRAP_SERVERS", None)  # the demo's own embedded broker, so its removal is checked too
    demo = subprocess.Popen([sys.executable, "-m", "dare.cli", "demo", "--limit", "1", "--ratings", "5000",
                             "--records", str(tmp_path / "k.jsonl")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in demo.stdout], daemon=True).start()  # type: ignore[union-attr]
    seen, deadline = [], time.monotonic() + 180
    while not any(line.startswith("phase 1") for line in seen):
        assert time.monotonic() < deadline and demo.poll() is None, "".join(seen)
        try:
            seen.append(lines.get(timeout=1))
        except queue.Empty:
            pass
    text = "".join(seen)
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", text)]
    port = int(re.search(r"embedded broker at [\d.]+:(\d+)", text).group(1))  # type: ignore[union-attr]
    assert len(pids) == 2 and all(_alive(p) for p in pids) and port_in_use(port)

    demo.send_signal(signal.SIGINT)
    assert demo.wait(60) == 130
    time.sleep(0.5)
    left = [p for p in pids if _alive(p)]
    assert not left, f"still running: {left}"
    assert not port_in_use(port), "the embedded broker is still listening"
