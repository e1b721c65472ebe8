"""Attention for the lean forward: grouped-query attention without copying the KV cache.

transformers' SDPA path repeats every key/value head for each query head it serves (`repeat_kv`)
whenever a mask is given: a full copy of the cache per layer per forward, the largest cost of a
batched verify step on CPU (SmolLM2: 3 query heads per key/value head). On the CPU, torch's SDPA
takes the grouping itself (`enable_gqa`, with a mask). Elsewhere
(CUDA's fused kernels refuse a mask with `enable_gqa`) the query heads that share a key/value head
are stacked along the query axis instead, so attention reads the cache in place. Same result up to
summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
