"""Verification: one forward pass over the pending token plus the flattened draft tree.

Stock transformers models take a ready 4D additive attention mask as-is: every tree node sees
the cached context and its own ancestors, and its position id is the context length plus its
depth. No model code is patched. After acceptance, the KV cache keeps only the accepted path.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from transformers import Cache, DynamicCache

from workers.engine.attention import grouped
from workers.engine.draft import DraftTree


@lru_cache(maxsize=16)
def cache_argument(model_class: type) -> str:
    """transformers renamed `past_key_values` to `cache` in 5.x minors: use what this one takes."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """A cache of plain full-attention layers. Our own 4D mask decides what each token sees, so
    sliding-window models (Mistral) are treated as full attention: exact while the sequence is
    shorter than their window (4096 for Mistral-7B), which knowledge prompts are."""
    return DynamicCache()


def cache_length(cache: DynamicCache) -> int:
    return cache.get_seq_length()


def forward(model: torch.nn.Module, cache: Cache, input_ids: torch.Tensor, position_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
    """Logits for `input_ids` (batch, n) (the last `logits_to_keep` only, if set), appending their
    keys/values to `cache`."""
    kwargs = {cache_argument(type(model)): cache, "logits_to_keep": logits_to_keep}
    with grouped(model):
        out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=True, **kwargs)
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


def tree_inputs(pending: int, tree: DraftTree, past: int, device: torch.device, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, position ids and the 4D additive mask for verifying `tree` after `past` cached tokens."""
    n = len(tree) + 1
    ids = torch.tensor([[pending, *tree.tokens]], device=device)
    positions = torch.tensor([[past, *(past + d for d in tree.depths)]], device=device)
    visible = torch.ones((n, past + n), dtype=torch.bool)
    visible[:, past:] = ancestor_matrix(tree.parents)
    mask = torch.zeros((1, 1, n, past + n), dtype=dtype)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return ids, positions, mask.to(device)


def keep_accepted(cache: DynamicCache, past: int, kept: list[int]) -> None:
    """Drop the cache entries of rejected tree positions. `kept` lists the tree positions to keep
    (0 = the pending token, then accepted nodes, in increasing order)."""
    n_kept = len(kept)
    contiguous = kept == list(range(n_kept))
    for layer in cache.layers:
        if not contiguous:
            index = torch.tensor([past + k for k in kept], device=layer.keys.device)
            layer.keys[:, :, past : past + n_kept] = layer.keys.index_select(2, index)
            layer.values[:, :, past : past + n_kept] = layer.values.index_select(2, index)
        layer.keys = layer.keys[:, :, : past + n_kept]
        layer.values = layer.values[:, :, : past + n_kept]
