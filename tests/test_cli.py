from dare.cli import main


def test_schemas_export_command(tmp_path, capsys):
    assert main(["schemas", "export", str(tmp_path)]) == 0
    assert (tmp_path / "KnowledgeRecord.schema.json").is_file()


def test_generate_prints_text_and_speed(model_cache, lm, monkeypatch, capsys):
    monkeypatch.setenv("DARE_CACHE_DIR", str(model_cache))
    assert main(["generate", "--item", "1", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "6 tokens in" in out and "tokens/s" in out


def test_generate_decodes_with_dare_from_a_pool_file_beside_greedy(model_cache, lm, tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("DARE_CACHE_DIR", str(model_cache))
    prompt = "Introduce the movie Toy Story (1995) in one sentence."
    assert main(["generate", "--prompt", prompt, "--max-new-tokens", "16", "--device", "cpu"]) == 0
    greedy_text = capsys.readouterr().out.split("\n\n[")[0]
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"segment": "g-Animation", "text": greedy_text}) + "\n" + json.dumps({"text": "Another film."}) + "\n")
    assert main(["generate", "--prompt", prompt, "--mode", "strict", "--pool", str(pool), "--compare", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(greedy_text) and "[strict: 16 tokens in" in out and "tokens per step" in out
    assert "drafting from 2 pool texts" in out and "[ar: 16 tokens in" in out and "the same text as greedy" in out


def test_a_pool_file_leaves_out_the_entitys_own_text_and_names_a_bad_line(tmp_path):
    import pytest

    from dare.benchmarks.workload import WorkloadError, read_pool_texts

    path = tmp_path / "pool.jsonl"
    path.write_text('{"entity": "item-1", "text": "own"}\n{"entity_kind": "user", "entity_id": "1", "text": "a user"}\n'
                    '{"text": "bare"}\n')
    assert read_pool_texts(path, leave_out="item-1") == ["a user", "bare"]
    assert read_pool_texts(path, leave_out="user-1") == ["own", "bare"]
    path.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(WorkloadError, match=r"pool.jsonl:2: field 'text' missing"):
        read_pool_texts(path)


def test_missing_model_directory_is_a_one_line_error(tmp_path, capsys):
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path / "nope")]) == 1
    assert "not a local Hugging Face model directory" in capsys.readouterr().err


def test_bad_environment_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("DARE_MAX_NEW_TOKENS", "lots")
    assert main(["generate", "--prompt", "hi"]) == 2
    assert "max_new_tokens" in capsys.readouterr().err


def test_only_piped_commands_die_quietly_on_a_closed_pipe():
    """Services keep Python's SIGPIPE handling (an error they can handle, not a silent death)."""
    import signal

    from dare.cli import pipe_signal

    before = signal.getsignal(signal.SIGPIPE)
    try:
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # what Python sets at start-up
        for command in ("worker", "pool-builder", "broker", "demo", "bench", "generate-all", "produce"):
            pipe_signal(command)
            assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN, command
        pipe_signal("consume")
        assert signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGPIPE, before)
