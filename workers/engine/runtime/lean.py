"""A lean forward for Llama-shaped models: the engine's steps without transformers' per-layer Python.

With packed weights, transformers' modelling code (module calls, keyword plumbing, mask and output
objects, separate q/k/v and gate/up calls) was a tenth or more of a small model's step on a CPU
(docs/engine.md). This is the same computation written straight through, in the style of gpt-fast's model
loop: embedding, then per layer RMSNorm, q/k/v as one GEMM, rotary, the cache's `update`, grouped-query
SDPA with the engine's 4D mask, o, RMSNorm, gate/up as one GEMM, down; final norm and head. It reads
the model's norms, embedding and rotary embedding, and holds its own kernels of the linear layers, made
at construction by the `Kernels` given (as loaded, blocks or fp16: weights.py). The model is never
changed: transformers' forward still serves `generate` (the hf-generate reference) and every model
family not listed here (forward.py chooses).

With the engine's CPU kernels given as `glue` (on CPU at float32 with lighter weights: model.py), a
layer's glue runs in C++ too (kernels.cpp): RMSNorm, the residual add fused with the next RMSNorm,
rotary in place on the fused q/k/v output, SiLU(gate) * up: 4 calls where ~40 torch ops were; and
grouped-query attention over the slot cache (SDPA where its head size or layout does not fit).
Rounding moves by ~1e-5 in the logits (sums of squares, exp); rotary is bit-equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.engine.runtime import kernels
from workers.engine.runtime.attention import gqa_attention
from workers.engine.runtime.weights import Kernels, Projection, full_kernels

FAMILIES = ("llama", "mistral", "qwen2")  # same layer layout; qwen2's q/k/v biases live in its linears


def rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """transformers' RMSNorm (normalised in float32, scaled in the model's dtype), in one fused op."""
    return norm.weight * F.rms_norm(x.float(), (x.shape[-1],), None, norm.variance_epsilon).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def supports(model: torch.nn.Module) -> bool:
    """Whether `model` is of a family written here."""
    config = model.config
    return (getattr(config, "model_type", None) in FAMILIES and hasattr(model, "model")
            and hasattr(model.model, "rotary_emb") and not getattr(config, "use_sliding_window", False))


class Linears:
    """A model's linear layers as a forward runs them, made by `weights`: q/k/v and gate/up joined, one GEMM each
    (fewer, wider calls)."""

    def __init__(self, model: torch.nn.Module, weights: Kernels) -> None:
        layers = model.model.layers
        self.qkv = [Projection([la.self_attn.q_proj, la.self_attn.k_proj, la.self_attn.v_proj], weights) for la in layers]
        self.o = [Projection([la.self_attn.o_proj], weights) for la in layers]
        self.gate_up = [Projection([la.mlp.gate_proj, la.mlp.up_proj], weights) for la in layers]
        self.down = [Projection([la.mlp.down_proj], weights) for la in layers]
        self.head = Projection([model.lm_head], weights)

    def kernels(self) -> list[object]:
        return [p.kernel for p in [*self.qkv, *self.o, *self.gate_up, *self.down, self.head]]


class LeanForward:
    """The forward of a model `supports` accepts, its linear layers made by `weights`; with the engine's
    CPU kernels `glue`, its glue in C++ where the model fits (float32, SiLU). With `prefill` weights, prefills
    (`prefill=True`) run their GEMMs on those instead, one prompt at a time in chunks of `prefill_chunk` tokens
    aligned to the prompt's own positions (batch.py), so a prompt's cache never depends on what was prefilled
    beside it: a library GEMM's rounding of a row depends on the call's shape (docs/engine.md)."""

    def __init__(self, model: torch.nn.Module, weights: Kernels = full_kernels, glue: object | None = None,
                 prefill: Kernels | None = None, prefill_chunk: int = 256) -> None:
        if not supports(model):
            raise ValueError(f"no lean forward for {type(model).__name__} ({getattr(model.config, 'model_type', None)})")
        config = model.config
        self.model = model
        glue_fits = next(model.parameters()).dtype == torch.float32 and getattr(config, "hidden_act", None) == "silu"
        self.glue = glue if glue_fits else None
        self.name = ("lean" if self.glue is None else "lean+glue") + ("" if prefill is None else "+full-prefill")
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.linears = Linears(model, weights)
        self.prefill_linears = self.linears if prefill is None else Linears(model, prefill)
        self.prefill_chunk = None if prefill is None else prefill_chunk  # tokens per prefill call (None: any)

    @property
    def packs(self) -> bool:
        """Whether a step's rows may verify different numbers of tokens at no cost for the padding (`counts`)."""
        return self.glue is not None

    @torch.inference_mode()
    def __call__(self, cache: object, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 logits_to_keep: int = 0, prefill: bool = False, counts: list[int] | None = None) -> torch.Tensor:
        lin = self.prefill_linears if prefill else self.linears
        if self.glue is not None:
            if counts is not None:
                return self.packed(lin, cache, ids, positions, mask, counts)
            return self.glued(lin, cache, ids, positions, mask, logits_to_keep)
        inner = self.model.model
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, positions)
        cos, sin = cos[:, None], sin[:, None]
        for i, layer in enumerate(inner.layers):
            q, k, v = self.split_heads(i, lin.qkv[i].joined(rms_norm(h, layer.input_layernorm)))
            h = h + self.attend(lin, i, cache, rotate(q, cos, sin), rotate(k, cos, sin), v, mask)
            gate, up = lin.gate_up[i](rms_norm(h, layer.post_attention_layernorm))
            h = h + lin.down[i].joined(layer.mlp.act_fn(gate) * up)
        h = rms_norm(h, inner.norm)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return lin.head.joined(h)

    def split_heads(self, i: int, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Layer i's fused output (batch, tokens, q|k|v) as q, k, v of shape (batch, heads, tokens, head_dim)."""
        batch, tokens = qkv.shape[:2]
        return tuple(t.reshape(batch, tokens, -1, self.head_dim).transpose(1, 2) for t in qkv.split(self.linears.qkv[i].sizes, dim=-1))

    def attend(self, lin: Linears, i: int, cache: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               row_keys: torch.Tensor | None = None) -> torch.Tensor:
        """Layer i's attention from rotated q, k and v, through the cache: o_proj's output (batch, tokens, hidden)."""
        return lin.o[i].joined(self.attention(i, cache, q, k, v, mask, row_keys=row_keys))

    def attention(self, i: int, cache: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                  row_queries: torch.Tensor | None = None, row_keys: torch.Tensor | None = None) -> torch.Tensor:
        """Layer i's attention from rotated q, k and v, through the cache, before o_proj: (batch, tokens, heads * dim).
        The C++ kernel takes `row_queries`/`row_keys` (kernels.attention); SDPA computes everything."""
        scaling = self.model.model.layers[i].self_attn.scaling
        keys, values = cache.layers[i].update(k, v)  # type: ignore[attr-defined]
        if self.glue is not None:
            out = kernels.attention(self.glue, q, keys, values, mask, scaling, row_queries, row_keys)  # type: ignore[arg-type]
            if out is not None:
                return out
        return gqa_attention(q, keys, values, mask, scaling).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    @staticmethod
    def row_keys(cache: object) -> torch.Tensor | None:
        """The keys each row of the forward's rows may see: up to the last column it writes (the slot cache's
        rows have no holes), so attention skips the columns a longer row beside it fills, and each query the
        columns after its own (kernels.attention); None: every column."""
        columns = getattr(cache, "write_cols", None)
        return None if columns is None or columns.numel() == 0 else (columns.max(dim=1).values.cpu() + 1).contiguous()

    def glued(self, lin: Linears, cache: object, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
              logits_to_keep: int) -> torch.Tensor:
        """The same layers with their glue in the engine's C++ kernels (float32, CPU)."""
        lib, inner = self.glue, self.model.model
        batch, tokens = ids.shape
        h = inner.embed_tokens(ids).contiguous()  # the residual stream, updated in place
        cos, sin = (t.reshape(batch * tokens, -1).contiguous() for t in inner.rotary_emb(h, positions))
        layers = inner.layers
        first = layers[0].input_layernorm
        x = kernels.rms_norm(lib, h, first.weight, first.variance_epsilon)  # type: ignore[arg-type]
        row_keys = self.row_keys(cache)
        for i, layer in enumerate(layers):
            qkv = lin.qkv[i].joined(x)
            kernels.rope_(lib, qkv.view(batch * tokens, -1), cos, sin, self.heads + self.kv_heads, self.head_dim)  # type: ignore[arg-type]
            post = layer.post_attention_layernorm
            attended = self.attend(lin, i, cache, *self.split_heads(i, qkv), mask, row_keys)
            x = kernels.add_rms_norm(lib, h, attended, post.weight, post.variance_epsilon)  # type: ignore[arg-type]
            down = lin.down[i].joined(kernels.silu_mul(lib, lin.gate_up[i].joined(x)))  # type: ignore[arg-type]
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else inner.norm
            x = kernels.add_rms_norm(lib, h, down, norm.weight, norm.variance_epsilon)  # type: ignore[arg-type]
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return lin.head.joined(x)

    def packed(self, lin: Linears, cache: object, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               counts: list[int]) -> torch.Tensor:
        """`glued` for a step whose row b verifies only its first counts[b] tokens (the rest is padding): the
        linear layers and the glue run on those tokens alone, packed, and only their keys and values are written
        to the cache; attention takes the queries in the padded layout and computes only the real ones, each over
        its row's own keys. Every kernel here computes a token's row alone, so each token's logits are those of
        the padded step, bit for bit (tests/test_lean.py). Returns the logits packed: (sum(counts), vocab), row
        after row."""
        lib, inner = self.glue, self.model.model
        batch, tokens = ids.shape
        row_queries = torch.tensor(counts, dtype=torch.long)
        row_keys = cache.write_cols[:, 0].cpu() + row_queries  # type: ignore[attr-defined]
        keep = torch.cat([torch.arange(b * tokens, b * tokens + n) for b, n in enumerate(counts)]).to(ids.device)
        padded_writes = cache.write_rows, cache.write_cols  # type: ignore[attr-defined]
        cache.write_rows, cache.write_cols = (w.reshape(-1).index_select(0, keep)[None] for w in padded_writes)  # type: ignore[attr-defined]
        h = inner.embed_tokens(ids.reshape(-1).index_select(0, keep)).contiguous()  # (packed tokens, hidden)
        cos, sin = (t[0].contiguous() for t in inner.rotary_emb(h[None], positions.reshape(-1).index_select(0, keep)[None]))
        layers = inner.layers
        first = layers[0].input_layernorm
        x = kernels.rms_norm(lib, h, first.weight, first.variance_epsilon)  # type: ignore[arg-type]
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        padded_q = x.new_zeros(batch * tokens, q_size)  # padding queries stay zeros (and are never computed)
        for i, layer in enumerate(layers):
            qkv = lin.qkv[i].joined(x)
            kernels.rope_(lib, qkv, cos, sin, self.heads + self.kv_heads, self.head_dim)  # type: ignore[arg-type]
            padded_q.index_copy_(0, keep, qkv[:, :q_size])
            q = padded_q.view(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
            k, v = (t.reshape(1, -1, self.kv_heads, self.head_dim).transpose(1, 2)
                    for t in (qkv[:, q_size : q_size + kv_size], qkv[:, q_size + kv_size :]))
            attended = self.attention(i, cache, q, k, v, mask, row_queries, row_keys).view(batch * tokens, -1)
            attended = lin.o[i].joined(attended.index_select(0, keep))
            post = layer.post_attention_layernorm
            x = kernels.add_rms_norm(lib, h, attended, post.weight, post.variance_epsilon)  # type: ignore[arg-type]
            down = lin.down[i].joined(kernels.silu_mul(lib, lin.gate_up[i].joined(x)))  # type: ignore[arg-type]
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else inner.norm
            x = kernels.add_rms_norm(lib, h, down, norm.weight, norm.variance_epsilon)  # type: ignore[arg-type]
        cache.write_rows, cache.write_cols = padded_writes  # type: ignore[attr-defined]
        return lin.head.joined(x)
