import pytest

from dare.benchmarks.reference import hf_generate
from workers.engine.runtime.model import ModelLoadError, chat_input_ids, load_model


def test_loads_from_the_packaged_gguf_then_from_the_cache(lm, model_cache, monkeypatch):
    from workers.engine.runtime import model

    assert lm.model_id == "SmolLM2-135M-Instruct"
    assert (model_cache / "models" / "SmolLM2-135M-Instruct" / "config.json").is_file()

    def no_second_conversion(*args):
        raise AssertionError("converted the GGUF again instead of reading the cache")

    monkeypatch.setattr(model, "convert_gguf", no_second_conversion)
    again = load_model(None, "cpu", "float32", model_cache)
    assert type(again.model).__name__ == "LlamaForCausalLM"


def test_greedy_output_is_deterministic(lm):
    ids = chat_input_ids(lm.tokenizer, "Introduce the movie Toy Story (1995) in one sentence.")
    first = hf_generate(lm, ids, 24)
    second = hf_generate(lm, ids, 24)
    assert first.token_ids == second.token_ids
    assert len(first.token_ids) > 0 and first.text.strip()


def test_a_directory_that_is_not_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), "cpu", "float32", tmp_path)
