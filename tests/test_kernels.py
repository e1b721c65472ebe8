"""The engine's CPU kernels (kernels.py, kernels.cpp): a layer's glue against transformers' own
modules (rotary bit for bit, RMSNorm and SiLU within fp32 rounding), every row the same whatever
the rows beside it, and a failed build that says why and leaves nothing behind."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from workers.engine.runtime import kernels

pytestmark = pytest.mark.skipif(kernels.unavailable() is not None, reason=f"no CPU kernels here: {kernels.unavailable()}")


@pytest.fixture(scope="module", params=kernels.runnable())  # AVX-512: another order of sums, the same rules
def lib(tmp_path_factory, request):
    return kernels.build(tmp_path_factory.mktemp("kernels"), request.param)


def test_rms_norm_and_the_residual_add_match_transformers(lib):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(100, eps=1e-5)
    norm.weight.data = torch.randn(100)
    h, delta = torch.randn(3, 5, 100) * 4, torch.randn(3, 5, 100)
    with torch.inference_mode():
        torch.testing.assert_close(kernels.rms_norm(lib, h, norm.weight, 1e-5), norm(h), atol=2e-6, rtol=2e-6)
        expected_h = h + delta
        out = kernels.add_rms_norm(lib, h, delta, norm.weight, 1e-5)
        assert torch.equal(h, expected_h)  # the residual stream, in place
        torch.testing.assert_close(out, norm(expected_h), atol=2e-6, rtol=2e-6)


def test_rope_is_transformers_rotary_bit_for_bit_on_q_and_k_only(lib):
    torch.manual_seed(1)
    rows, heads, kv, dim = 6, 4, 2, 16
    qkv = torch.randn(rows, (heads + 2 * kv) * dim)
    angles = torch.randn(rows, dim // 2) * 3
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q = qkv[:, :heads * dim].reshape(1, rows, heads, dim).transpose(1, 2)
    k = qkv[:, heads * dim:(heads + kv) * dim].reshape(1, rows, kv, dim).transpose(1, 2)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    v = qkv[:, (heads + kv) * dim:].clone()
    kernels.rope_(lib, qkv, cos, sin, heads + kv, dim)
    assert torch.equal(qkv[:, :heads * dim].reshape(1, rows, heads, dim).transpose(1, 2), expected_q)
    assert torch.equal(qkv[:, heads * dim:(heads + kv) * dim].reshape(1, rows, kv, dim).transpose(1, 2), expected_k)
    assert torch.equal(qkv[:, (heads + kv) * dim:], v)


def test_silu_mul_matches_torch_and_rows_do_not_depend_on_the_batch(lib):
    torch.manual_seed(2)
    gate_up = torch.randn(40, 2 * 515) * 6  # 515: a tail past the 8-lane loop; 40 rows: split over threads
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, -88.0, 0.0])  # exp's range ends
    out = kernels.silu_mul(lib, gate_up)
    gate, up = gate_up.chunk(2, -1)
    torch.testing.assert_close(out, F.silu(gate) * up, atol=1e-6, rtol=3e-6)
    assert torch.isfinite(out).all()
    for row in (0, 17, 39):
        assert torch.equal(kernels.silu_mul(lib, gate_up[row:row + 1]), out[row:row + 1])


def test_attention_matches_sdpa_over_a_slot_cache_layout_and_rows_do_not_depend_on_the_batch(lib):
    torch.manual_seed(3)
    batch, heads, kv_heads, queries, keys, dim = 2, 9, 3, 5, 37, 64
    store = torch.randn(2, batch, kv_heads, 64, dim)  # keys and values in a larger cache, read in place
    k, v = store[0, :, :, :keys], store[1, :, :, :keys]
    qkv = torch.randn(batch, queries, (heads + 2 * kv_heads) * dim)  # q as the lean forward's view of fused q/k/v
    q = qkv[..., :heads * dim].reshape(batch, queries, heads, dim).transpose(1, 2)
    visible = torch.rand(batch, 1, queries, keys + 3) > 0.3
    visible[..., 0] = True
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    out = kernels.attention(lib, q, k, v, mask, 0.125)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[..., :keys], scale=0.125, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(batch, queries, heads * dim), atol=2e-6, rtol=1e-5)
    for t in (0, 3):  # one query alone: the same bits
        alone = kernels.attention(lib, q[:, :, t:t + 1], k, v, mask[:, :, t:t + 1], 0.125)
        assert torch.equal(alone, out[:, t:t + 1])
    assert kernels.attention(lib, q[..., :32], k[..., :32], v[..., :32], mask, 0.125) is None  # head size 32: SDPA's


def test_a_rows_attention_bits_depend_neither_on_longer_rows_nor_on_padding_queries(lib):
    """A row whose 4 queries sit at its last columns, 17 to 20, each seeing the columns up to its own (the mask hides
    the rest): the same bits when the batch's longest row reads 22, 29 or 37 columns, when the row's own keys are
    cut at its end (each query then reads up to its own column only), and when only its first queries are computed
    (the others come back zero)."""
    torch.manual_seed(5)
    heads, kv_heads, queries, dim, end = 9, 3, 4, 64, 21
    q = torch.randn(1, heads, queries, dim)
    store = torch.randn(2, 1, kv_heads, 40, dim)
    visible = torch.zeros(1, 1, queries, 40, dtype=torch.bool)
    for t in range(queries):
        visible[..., t, : end - queries + t + 1] = True
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    reference = kernels.attention(lib, q, store[0, :, :, :end], store[1, :, :, :end], mask, 0.125)
    for keys in (22, 29, 37):
        k, v = store[0, :, :, :keys], store[1, :, :, :keys]
        assert torch.equal(kernels.attention(lib, q, k, v, mask, 0.125), reference), keys
        assert torch.equal(kernels.attention(lib, q, k, v, mask, 0.125, None, torch.tensor([end])), reference), keys
        cut = kernels.attention(lib, q[:, :, :2], k, v, mask[:, :, :2], 0.125, torch.tensor([1]), torch.tensor([end - 2]))
        assert torch.equal(cut[:, :1], reference[:, :1]) and not cut[:, 1:].any(), keys


def test_build_errors_name_the_compiler(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "compiler", lambda: "/bin/false")  # a "compiler" that always fails
    with pytest.raises(kernels.KernelBuildError, match="false failed"):
        kernels._build(tmp_path)
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built left
