"""The engine's forward, chosen once when a model is loaded, and the masks its steps use.

A `Forward` maps (cache, ids, positions, 4D additive mask) to logits, appending the tokens' keys and
values to the cache. `engine_forward` builds the lean forward (lean.py) for the families it is written
for, with the linear layers' kernels and C++ glue given, and transformers' own forward for any other
model; nothing is switched or patched afterwards.

Verification is one forward over the pending token plus the flattened draft tree: every tree node
sees the cached context and its own ancestors, and its position id is the context length plus its
depth (stock transformers models take such a mask as-is). (The cache and the accepted path's
keys/values: cache.py, backends/batch.py.)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Protocol

import torch
from transformers import Cache

from workers.engine.runtime.lean import LeanForward, supports
from workers.engine.runtime.weights import Kernels, full_kernels


@lru_cache(maxsize=16)
def cache_argument(model_class: type) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.x minors: use what this one takes."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class Forward(Protocol):
    model: torch.nn.Module
    name: str  # "lean", "lean+glue" or "transformers"
    prefill_chunk: int | None  # prefills one prompt at a time, in chunks of this many tokens (None: as they come)
    packs: bool  # whether `counts` spares the padding's cost (else the padded step is computed whole)

    def __call__(self, cache: Cache, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 logits_to_keep: int = 0, prefill: bool = False, counts: list[int] | None = None) -> torch.Tensor:
        """Logits for `ids` (batch, n) (the last `logits_to_keep` only, if set), appending their keys/values to `cache`.
        `prefill`: the tokens are a prompt's (the forward may run them on other kernels). `counts` (a forward that
        `packs`): row b's tokens are its first counts[b], the rest padding, and the logits come packed,
        (sum(counts), vocab), row after row."""
        ...


class TransformersForward:
    """transformers' own forward of the model (or of `run`, its compiled form), weights as loaded."""

    name = "transformers"
    prefill_chunk = None
    packs = False

    def __init__(self, model: torch.nn.Module, run: Callable[..., Any] | None = None) -> None:
        self.model, self.run = model, model if run is None else run
        self.cache_argument = cache_argument(type(model))

    @torch.inference_mode()
    def __call__(self, cache: Cache, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 logits_to_keep: int = 0, prefill: bool = False, counts: list[int] | None = None) -> torch.Tensor:
        kwargs = {self.cache_argument: cache, "logits_to_keep": logits_to_keep}
        return self.run(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=True, **kwargs).logits


def engine_forward(model: torch.nn.Module, weights: Kernels = full_kernels, glue: object | None = None,
                   prefill: Kernels | None = None) -> Forward:
    """The lean forward where the model's family has one (linear layers made by `weights`, prefills' by `prefill`,
    C++ `glue`), else transformers' forward on the weights as loaded."""
    return LeanForward(model, weights, glue, prefill) if supports(model) else TransformersForward(model)


def ancestor_matrix(parents: list[int]) -> torch.Tensor:
    """anc[i, j] is True when tree position j is i itself or one of its ancestors.
    Position 0 is the pending token (the root); draft node i sits at position i + 1."""
    n = len(parents) + 1
    anc = torch.zeros((n, n), dtype=torch.bool)
    anc[:, 0] = True  # everyone sees the root
    for i, parent in enumerate(parents, start=1):
        anc[i] = anc[parent + 1]
        anc[i, i] = True
    return anc


def additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask of a boolean `visible` (0 where visible, the dtype's minimum elsewhere)."""
    return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)


def causal_mask(queries: int, past: int, dtype: torch.dtype, span: int | None = None) -> torch.Tensor:
    """The (1, 1, queries, span) additive mask of `queries` new tokens after `past` cached ones
    (`span`: columns read, past + queries if None; columns beyond those are hidden)."""
    visible = torch.zeros((queries, span or past + queries), dtype=torch.bool)
    visible[:, : past + queries] = torch.ones((queries, past + queries), dtype=torch.bool).tril(past)
    return additive(visible, dtype)[None, None]
