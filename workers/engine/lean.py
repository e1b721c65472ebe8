"""A lean forward for Llama-shaped models: the engine's steps without transformers' per-layer Python.

With packed weights, transformers' modelling code (module calls, keyword plumbing, mask and output
objects, separate q/k/v and gate/up calls) was ~5-10 ms of a 45-70 ms step of SmolLM2 on this CPU
(README, "A lean forward"). This is the same computation written straight through, in the style of gpt-fast's model
loop: embedding, then per layer RMSNorm, q/k/v as one GEMM, rotary, the cache's `update`, grouped-query
SDPA with the engine's 4D mask, o, RMSNorm, gate/up as one GEMM, down; final norm and head. It uses
the model's own modules and weights (fused copies of q/k/v and gate/up in the layers' kind: as
loaded, blocks or fp16: weights.py) and its own rotary embedding; nothing is patched, and transformers'
forward still serves `generate` (the hf-generate reference) and every model family not listed here.

Only the engine's forwards use it (verify.forward), and only for models `attach` accepted.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F

from workers.engine.attention import gqa_attention
from workers.engine.weights import FusedLinear

FAMILIES = ("llama", "mistral", "qwen2")  # same layer layout; qwen2's q/k/v biases live in its linears
_LEAN: WeakKeyDictionary[torch.nn.Module, LeanForward] = WeakKeyDictionary()


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """transformers' RMSNorm (normalised in float32, scaled in the model's dtype), in one fused op."""
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), None, norm.variance_epsilon).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LeanForward:
    def __init__(self, model: torch.nn.Module) -> None:
        config = model.config
        self.model = model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        # q/k/v and gate/up read the same input: one GEMM each (fewer, wider calls)
        self.qkv = [FusedLinear([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
                    for layer in model.model.layers]
        self.gate_up = [FusedLinear([layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in model.model.layers]

    @torch.inference_mode()
    def __call__(self, cache: object, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 logits_to_keep: int = 0) -> torch.Tensor:
        inner = self.model.model
        batch, tokens = ids.shape
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, positions)
        cos, sin = cos[:, None], sin[:, None]
        for i, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = rms_norm(h, layer.input_layernorm)
            q, k, v = self.qkv[i](x)
            q = q.reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
            k = k.reshape(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.reshape(batch, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            keys, values = cache.layers[i].update(rotate(k, cos, sin), v)  # type: ignore[attr-defined]
            out = gqa_attention(rotate(q, cos, sin), keys, values, mask, attn.scaling)
            h = h + attn.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))
            x = rms_norm(h, layer.post_attention_layernorm)
            gate, up = self.gate_up[i](x)
            h = h + mlp.down_proj(mlp.act_fn(gate) * up)
        h = rms_norm(h, inner.norm)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.model.lm_head(h)


def attach(model: torch.nn.Module) -> bool:
    """Use the lean forward for `model`'s engine steps, if its family is one written here."""
    config = model.config
    supported = (getattr(config, "model_type", None) in FAMILIES and hasattr(model, "model")
                 and hasattr(model.model, "rotary_emb") and not getattr(config, "use_sliding_window", False))
    if supported:
        _LEAN[model] = LeanForward(model)
    return supported


def lean_forward(model: torch.nn.Module) -> LeanForward | None:
    return _LEAN.get(model)
