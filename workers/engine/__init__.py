"""The engine's front door: what the worker, the pools and the `dare` tools import (nothing deeper).

    algorithm/  the DARE algorithm, device-free: pools as tries (trie.py), drafting (draft.py), acceptance
                (accept.py), the draft budget (budget.py), the cost curve and its cache (cost.py), what each
                mode does (modes.py), knowledge texts into pools (texts.py)
    runtime/    a model run fast on a device: loading (model.py), packed weights and their kernels (weights.py,
                blocks.py, kernels.py + kernels.cpp), the forward (forward.py, lean.py, attention.py), the KV
                cache (cache.py), compiled steps (steps.py)
    backends/   engines that decode with both: transformers (this project's batch decoder over runtime/:
                transformers.py, batch.py) and vllm (DARE inside vLLM: vllm.py)

Every backend is an `Engine` whose `decoder(rows)` is a `Decoder`; `open_engine` makes one by name; `generate`
(generate.py) decodes a list of prompts with it, drafting from a list of knowledge texts: DARE in one's own
process, no Kafka (docs/python.md).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, Protocol

from workers.engine.algorithm.cost import CostModel
from workers.engine.algorithm.draft import DraftConfig, Source
from workers.engine.algorithm.modes import MODES, Strategy
from workers.engine.algorithm.texts import PoolTexts
from workers.engine.algorithm.trie import Pool
from workers.engine.backends.batch import Finished, RequestStats
from workers.engine.backends.transformers import Output, TransformersEngine, load_or_measure
from workers.engine.generate import generate
from workers.engine.runtime.model import LoadedModel, ModelLoadError, cached_default_model, chat_input_ids, load_model, model_id

BACKENDS = ("transformers", "vllm")
VLLM_CONTEXT = 4096  # the vLLM engine's longest request (prompt + new tokens): bounds its KV cache

__all__ = ["BACKENDS", "MODES", "CostModel", "Decoder", "DraftConfig", "Engine", "Finished", "LoadedModel", "ModelLoadError",
           "Output", "Pool", "PoolTexts", "RequestStats", "Source", "Strategy", "TransformersEngine", "cached_default_model",
           "chat_input_ids", "generate", "load_model", "load_or_measure", "model_id", "open_engine"]


class Decoder(Protocol):
    """Decodes the requests added to it, a step at a time, all together."""

    def __len__(self) -> int: ...  # requests held

    def add(self, key: Hashable, input_ids: Sequence[int], max_new_tokens: int, mode: str = "ar",
            sources: Sequence[Source] = ()) -> Any: ...  # strict/relaxed draft from `sources` (live pools)

    def step(self) -> list[Finished]: ...  # one step over every request held; those that finished


class Engine(Protocol):
    name: str
    cost: CostModel  # step time by tokens in the step, on this device
    context_limit: int  # the longest request (prompt + new tokens) it serves

    def mode_for(self, mode: str) -> str: ...  # the mode a request asking for `mode` decodes in

    def decoder(self, rows: int) -> Decoder: ...

    def learn_from(self, texts: Sequence[str]) -> None: ...  # earlier knowledge texts, for engines that draft from their own cache


def open_engine(backend: str, lm: LoadedModel, cache_dir: Path | None, *, rows: int = 1, model_dir: str | None = None,
                vllm_method: str = "dare", eager: bool = False, learn: bool = True, strategy: Strategy | None = None) -> Engine:
    """`transformers` over `lm`, or `vllm` (the vllm extra) over the same model's directory (`model_dir`; default the
    packaged model) decoding up to `rows` requests at once with `vllm_method`: dare, or vLLM's own greedy / ngram /
    suffix. `learn` False: no prefix cache, no answers kept for drafting (benches that repeat prompts). `strategy`:
    how the modes draft and accept (default `Strategy()`)."""
    if backend == "transformers":
        return TransformersEngine(lm, load_or_measure(lm, cache_dir), strategy)
    if backend == "vllm":
        from workers.engine.backends.vllm import VllmEngine, load_or_probe

        context = min(int(getattr(lm.model.config, "max_position_embeddings", 8192)), VLLM_CONTEXT)
        engine = VllmEngine(model_dir or str(cached_default_model(cache_dir)), vllm_method, eager=eager, max_model_len=context,
                            max_num_seqs=rows, prefix_caching=learn, forget_answers=not learn, strategy=strategy)
        if vllm_method == "dare":
            engine.set_cost(load_or_probe(engine, cache_dir))
        return engine
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")


def __getattr__(name: str) -> Any:
    """The vLLM backend's names, imported on first use: importing vLLM takes seconds and the extra may be absent."""
    if name in ("VllmEngine", "VllmMissing", "load_or_probe", "require_vllm", "runtime_env"):
        from workers.engine.backends import vllm

        return getattr(vllm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
