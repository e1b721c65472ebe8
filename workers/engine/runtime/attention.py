"""Attention for decoding forwards: grouped-query attention without copying the KV cache.

transformers' SDPA path repeats every key/value head for each query head it serves (`repeat_kv`)
whenever a mask is given: a full copy of the cache per layer per forward, the largest cost of a
batched verify step on CPU (SmolLM2: 3 query heads per key/value head). On the CPU, torch's SDPA
takes the grouping itself (`enable_gqa`, with a mask; 2.6x faster per layer for one token where it
was measured, same values). Elsewhere (CUDA's fused kernels refuse a mask with
`enable_gqa`) the query heads that share a key/value head are stacked along the query axis instead,
so attention reads the cache in place. Same result up to summation order.

Registered under its own name and switched on only around our own forwards (`grouped`), so
transformers' `generate` — the `hf-generate` reference — runs stock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "dare_grouped_sdpa"


def gqa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                  scaling: float | None) -> torch.Tensor:
    """SDPA of query (batch, heads, q, dim) over key/value (batch, kv_heads, keys, dim) under an additive
    mask (batch, 1, q, >= keys) shared by all heads; (batch, heads, q, dim), the cache never copied."""
    batch, heads, q, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    mask = mask[:, :, :, :keys]
    if query.device.type == "cpu" or heads == kv_heads:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=heads != kv_heads)
    group = heads // kv_heads
    query = query.reshape(batch, kv_heads, group * q, dim)
    mask = mask[:, :, None].expand(mask.shape[0], 1, group, q, keys).reshape(mask.shape[0], 1, group * q, keys)  # one mask, every head
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling).reshape(batch, heads, q, dim)


def grouped_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs: object) -> tuple[torch.Tensor, None]:
    if attention_mask is None or attention_mask.shape[1] != 1 or query.shape[1] == key.shape[1] or dropout:  # stock SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)  # type: ignore[arg-type]
    return gqa_attention(query, key, value, attention_mask, scaling).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_sdpa)


@contextmanager
def grouped(model: torch.nn.Module) -> Iterator[None]:
    """Use grouped attention for the forwards inside, where the model runs stock SDPA."""
    config = model.config
    before = config._attn_implementation
    if before != "sdpa":
        yield
        return
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = before
