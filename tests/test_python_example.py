"""The Python example of docs/python.md runs as written, and its strict output equals greedy's (it asserts so)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).parents[1] / "docs" / "python.md"


@pytest.mark.model
def test_the_documented_example_runs_as_written(model_cache, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert len(blocks) == 1
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    # as a user runs it: a fresh interpreter, from the repository root (DARE_CACHE_DIR: this test session's cache)
    done = subprocess.run([sys.executable, str(script)], check=False, cwd=DOC.parents[1], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if "tokens per step" in line]  # besides the engine's log lines
    assert len(lines) == 2, done.stdout


@pytest.mark.model
def test_generate_keeps_the_prompts_order_past_its_rows_and_rejects_bad_input(lm, model_cache):
    from workers.engine import generate, open_engine

    engine = open_engine("transformers", lm, model_cache)
    prompts = [f"Name {n} fruit." for n in range(1, 4)]
    batched = generate(engine, lm.tokenizer, prompts, mode="ar", max_new_tokens=8, rows=2)  # 3 prompts, 2 rows at a time
    alone = [generate(engine, lm.tokenizer, [p], mode="ar", max_new_tokens=8, rows=1)[0] for p in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    with pytest.raises(ValueError, match="mode must be one of"):
        generate(engine, lm.tokenizer, prompts, mode="fast")
    with pytest.raises(ValueError, match="exceed the model's context"):
        generate(engine, lm.tokenizer, ["word " * 9000], mode="ar")
