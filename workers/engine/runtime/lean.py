"""A lean forward for Llama-shaped models: the engine's steps without transformers' per-layer Python.

With packed weights, transformers' modelling code (module calls, keyword plumbing, mask and output
objects, separate q/k/v and gate/up calls) was a tenth or more of a small model's step on a CPU
(docs/engine.md). This is the same computation written straight through, in the style of gpt-fast's model
loop: embedding, then per layer RMSNorm, q/k/v as one GEMM, rotary, the cache's `update`, grouped-query
SDPA with the engine's 4D mask, o, RMSNorm, gate/up as one GEMM, down; final norm and head. It uses
the model's own modules and weights (fused copies of q/k/v and gate/up in the layers' kind: as
loaded, blocks or fp16: weights.py) and its own rotary embedding; nothing is patched, and transformers'
forward still serves `generate` (the hf-generate reference) and every model family not listed here.

With the engine's CPU kernels given (`attach(model, lib)`, on CPU at float32 with lighter weights:
model.py), a layer's glue runs in C++ too (kernels.cpp): RMSNorm, the residual add fused with the next
RMSNorm, rotary in place on the fused q/k/v output, SiLU(gate) * up: 4 calls where ~40 torch ops were;
and grouped-query attention over the slot cache (SDPA where its head size or layout does not fit).
Rounding moves by ~1e-5 in the logits (sums of squares, exp); rotary is bit-equal.

Only the engine's forwards use it (verify.forward), and only for models `attach` accepted.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F

from workers.engine.runtime import kernels
from workers.engine.runtime.attention import gqa_attention
from workers.engine.runtime.weights import FusedLinear

FAMILIES = ("llama", "mistral", "qwen2")  # same layer layout; qwen2's q/k/v biases live in its linears
_LEAN: WeakKeyDictionary[torch.nn.Module, LeanForward] = WeakKeyDictionary()


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """transformers' RMSNorm (normalised in float32, scaled in the model's dtype), in one fused op."""
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), None, norm.variance_epsilon).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LeanForward:
    def __init__(self, model: torch.nn.Module, lib: object | None = None) -> None:
        config = model.config
        self.model = model
        glue_fits = next(model.parameters()).dtype == torch.float32 and getattr(config, "hidden_act", None) == "silu"
        self.glue = lib if glue_fits else None
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
        if self.glue is not None:
            return self.glued(cache, ids, positions, mask, logits_to_keep)
        inner = self.model.model
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, positions)
        cos, sin = cos[:, None], sin[:, None]
        for i, layer in enumerate(inner.layers):
            q, k, v = self.split_heads(i, self.qkv[i].joined(rms_norm(h, layer.input_layernorm)))
            h = h + self.attend(i, cache, rotate(q, cos, sin), rotate(k, cos, sin), v, mask)
            gate, up = self.gate_up[i](rms_norm(h, layer.post_attention_layernorm))
            h = h + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
        h = rms_norm(h, inner.norm)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.model.lm_head(h)

    def split_heads(self, i: int, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Layer i's fused output (batch, tokens, q|k|v) as q, k, v of shape (batch, heads, tokens, head_dim)."""
        batch, tokens = qkv.shape[:2]
        return tuple(t.reshape(batch, tokens, -1, self.head_dim).transpose(1, 2) for t in qkv.split(self.qkv[i].sizes, dim=-1))

    def attend(self, i: int, cache: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Layer i's attention from rotated q, k and v, through the cache: o_proj's output (batch, tokens, hidden)."""
        attn = self.model.model.layers[i].self_attn
        keys, values = cache.layers[i].update(k, v)  # type: ignore[attr-defined]
        if self.glue is not None:
            out = kernels.attention(self.glue, q, keys, values, mask, attn.scaling)  # type: ignore[arg-type]
            if out is not None:
                return attn.o_proj(out)
        out = gqa_attention(q, keys, values, mask, attn.scaling)
        return attn.o_proj(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1))

    def glued(self, cache: object, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
              logits_to_keep: int) -> torch.Tensor:
        """The same layers with their glue in the engine's C++ kernels (float32, CPU)."""
        lib, inner = self.glue, self.model.model
        batch, tokens = ids.shape
        h = inner.embed_tokens(ids).contiguous()  # the residual stream, updated in place
        cos, sin = (t.reshape(batch * tokens, -1).contiguous() for t in inner.rotary_emb(h, positions))
        layers = inner.layers
        first = layers[0].input_layernorm
        x = kernels.rms_norm(lib, h, first.weight, first.variance_epsilon)  # type: ignore[arg-type]
        for i, layer in enumerate(layers):
            qkv = self.qkv[i].joined(x)
            kernels.rope_(lib, qkv.view(batch * tokens, -1), cos, sin, self.heads + self.kv_heads, self.head_dim)  # type: ignore[arg-type]
            post = layer.post_attention_layernorm
            attended = self.attend(i, cache, *self.split_heads(i, qkv), mask)
            x = kernels.add_rms_norm(lib, h, attended, post.weight, post.variance_epsilon)  # type: ignore[arg-type]
            down = layer.mlp.down_proj(kernels.silu_mul(lib, self.gate_up[i].joined(x)))  # type: ignore[arg-type]
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else inner.norm
            x = kernels.add_rms_norm(lib, h, down, norm.weight, norm.variance_epsilon)  # type: ignore[arg-type]
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.model.lm_head(x)


def attach(model: torch.nn.Module, lib: object | None = None) -> bool:
    """Use the lean forward for `model`'s engine steps, if its family is one written here; with the
    engine's CPU kernels `lib`, its glue in C++ where the model fits (float32, SiLU)."""
    config = model.config
    supported = (getattr(config, "model_type", None) in FAMILIES and hasattr(model, "model")
                 and hasattr(model.model, "rotary_emb") and not getattr(config, "use_sliding_window", False))
    if supported:
        _LEAN[model] = LeanForward(model, lib)
    return supported


def lean_forward(model: torch.nn.Module) -> LeanForward | None:
    return _LEAN.get(model)
