from dare.cli import main


def test_schemas_export_command(tmp_path, capsys):
    assert main(["schemas", "export", str(tmp_path)]) == 0
    assert (tmp_path / "KnowledgeRecord.schema.json").is_file()


def test_generate_prints_text_and_speed(model_cache, lm, monkeypatch, capsys):
    monkeypatch.setenv("DARE_CACHE_DIR", str(model_cache))
    assert main(["generate", "--item", "1", "--max-new-tokens", "6", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "6 tokens in" in out and "tokens/s" in out


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
