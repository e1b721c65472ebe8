"""Verification: one forward pass over the pending token plus the flattened draft tree.

Stock transformers models take a ready 4D additive attention mask as-is: every tree node sees
the cached context and its own ancestors, and its position id is the context length plus its
depth. No model code is patched. (The cache and the accepted path's keys/values: cache.py, backends/batch.py.)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
from transformers import Cache

from workers.engine.runtime.attention import grouped
from workers.engine.runtime.lean import lean_forward


@lru_cache(maxsize=16)
def cache_argument(model_class: type) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.x minors: use what this one takes."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def forward(model: torch.nn.Module, cache: Cache, input_ids: torch.Tensor, position_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0, run: Callable[..., Any] | None = None
            ) -> torch.Tensor:
    """Logits for `input_ids` (batch, n) (the last `logits_to_keep` only, if set), appending their
    keys/values to `cache`. `run`: what to call instead of `model` (its compiled form). Models with
    a lean forward attached (lean.py) run it, unless `run` is given."""
    lean = lean_forward(model) if run is None else None
    if lean is not None and attention_mask is not None:
        return lean(cache, input_ids, position_ids, attention_mask, logits_to_keep)
    kwargs = {cache_argument(type(model)): cache, "logits_to_keep": logits_to_keep}
    with grouped(model):
        out = (model if run is None else run)(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=True, **kwargs)
    return out.logits


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
