"""Lighter weights (weights.py), each kind: the engine's forward of a tiny float32 Llama whose linear
layers run fbgemm's fp16 GEMM, or the block kernels on weights made of Q4_1/Q8_0 blocks, still decodes
strict = its own greedy (batch 1 and batched); the model itself stays stock bit for bit; weights that
are not blocks are refused; the setting resolves or fails with a clear reason."""

import random

import pytest
import torch

from tests.test_batch import join, pools_with_answers, run_to_end
from tests.test_blocks import as_blocks
from tests.test_engine import EOS, VOCAB, decode, greedy, random_pools, tiny_llama
from workers.engine.algorithm.draft import DraftConfig
from workers.engine.backends.batch import BatchDecoder
from workers.engine.runtime import kernels
from workers.engine.runtime.cache import SlotCache
from workers.engine.runtime.forward import causal_mask
from workers.engine.runtime.lean import LeanForward
from workers.engine.runtime.steps import StepForward
from workers.engine.runtime.weights import (
    BlockKernel,
    Fp16Kernel,
    FullKernel,
    NotBlocksError,
    fp16_available,
    full_kernels,
    linear_kernels,
    resolve_weights,
)

needs_fp16 = pytest.mark.skipif(fp16_available() is not None, reason=f"no packed fp16 here: {fp16_available()}")
needs_blocks = pytest.mark.skipif(kernels.unavailable() is not None, reason=f"no block kernels here: {kernels.unavailable()}")
KINDS = [pytest.param("fp16", marks=needs_fp16), pytest.param("blocks", marks=needs_blocks)]


def stock_tiny(kind):
    model = tiny_llama().to(torch.float32)
    return as_blocks(model) if kind == "blocks" else model


@pytest.fixture(scope="module", params=KINDS)
def packed(request, tmp_path_factory):
    """The lean forward of a stock tiny model, its linear layers in the kind asked for."""
    model = stock_tiny(request.param)
    return LeanForward(model, linear_kernels(model, request.param, tmp_path_factory.mktemp("cache")))


def prefill_logits(forward, ids):
    cache = SlotCache(forward.model)
    cache.reserve(1, ids.shape[1])
    cache.prepare(0, torch.arange(ids.shape[1])[None], ids.shape[1])
    return forward(cache, ids, torch.arange(ids.shape[1])[None], causal_mask(ids.shape[1], 0, torch.float32))


@torch.inference_mode()
def test_packed_logits_are_the_kernels_and_the_model_stays_stock(packed):
    kinds = {type(k) for k in packed.linears.kernels()}
    kind = "blocks" if kinds == {BlockKernel} else "fp16"
    assert kinds == {BlockKernel if kind == "blocks" else Fp16Kernel}  # every layer, fused or not
    stock = stock_tiny(kind)
    ids = torch.tensor([[5, 9, 13, 2, 7, 30, 11]])
    reference = stock(ids).logits
    fast = prefill_logits(packed, ids)
    if kind == "fp16":  # weights rounded to fp16
        assert not torch.equal(fast, reference)  # the packed kernel really ran
        torch.testing.assert_close(fast, reference, atol=0.05, rtol=0.01)
    else:  # the same weights, only the order of fp32 sums differs
        torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-5)
    assert torch.equal(packed.model(ids).logits, reference)  # the model's own forward: untouched
    assert all(type(m) is torch.nn.Linear for m in packed.model.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("seed", range(3))
def test_strict_equals_its_own_greedy_with_packed_weights(packed, seed):
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(6)]
    pools = random_pools(packed.model, rng, prompts)
    accepted = 0
    for prompt in prompts:
        out = decode(packed.model, prompt, pools, "strict", n=30, config=DraftConfig(max_nodes=16, max_depth=8), forward=packed)
        assert out.token_ids == greedy(packed.model, prompt, 30)
        accepted += sum(out.stats.accepted) - out.stats.steps
    assert accepted > 0


def test_batched_strict_rows_equal_their_own_greedy_with_packed_weights(packed):
    rng = random.Random(4)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(2, 30))] for _ in range(7)]
    pool = pools_with_answers(packed.model, prompts, rng)
    decoder = BatchDecoder(packed.model, {EOS}, steps=StepForward(packed))
    for i, prompt in enumerate(prompts):
        join(decoder, i, prompt, pool, 30)
    results = run_to_end(decoder)
    for i, prompt in enumerate(prompts):
        assert results[i].token_ids == greedy(packed.model, prompt, 30), f"row {i}"


@needs_blocks
def test_prefills_on_other_weights_in_fixed_chunks_keep_strict_equal_to_the_engines_own_greedy(tmp_path):
    """Steps on blocks, prefills on the weights as loaded (another GEMM, whose rounding of a row depends on the
    call's shape), one prompt at a time in chunks of 4: each row of a mixed strict batch equals that prompt's
    `ar` decoding alone, token for token."""
    model = stock_tiny("blocks")
    forward = LeanForward(model, linear_kernels(model, "blocks", tmp_path), prefill=full_kernels, prefill_chunk=4)
    assert forward.prefill_chunk == 4 and forward.name == "lean+full-prefill"
    assert {type(k) for k in forward.prefill_linears.kernels()} == {FullKernel}
    rng = random.Random(6)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(2, 30))] for _ in range(7)]
    alone = [decode(model, p, [], "ar", n=30, forward=forward).token_ids for p in prompts]
    pool = pools_with_answers(model, prompts, rng)
    decoder = BatchDecoder(model, {EOS}, steps=StepForward(forward))
    for i, prompt in enumerate(prompts):
        join(decoder, i, prompt, pool, 30)
    results = run_to_end(decoder)
    assert [results[i].token_ids for i in range(len(prompts))] == alone
    assert sum(sum(r.stats.drafted) for r in results.values()) > 0  # drafts were verified


@needs_blocks
def test_weights_that_are_not_blocks_are_refused(tmp_path):
    model = tiny_llama().to(torch.float32)
    with pytest.raises(NotBlocksError, match="model.layers.0.self_attn.q_proj's weights are not exact Q4_1/Q8_0 blocks"):
        linear_kernels(model, "blocks", tmp_path)


@needs_fp16
def test_weights_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_weights("auto", cpu, torch.float32) == ("blocks" if kernels.unavailable() is None else "fp16")
    assert resolve_weights("fp16", cpu, torch.float32) == "fp16"
    assert resolve_weights("full", cpu, torch.float32) == "full"
    assert resolve_weights("auto", cpu, torch.float64) == "full"
    assert resolve_weights("auto", cuda, torch.bfloat16) == "full"
    with pytest.raises(ValueError, match="float32 activations.*--weights full"):
        resolve_weights("fp16", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="CPU kernel"):
        resolve_weights("fp16", cuda, torch.float32)
    with pytest.raises(ValueError, match="--weights blocks: needs float32 activations.*--weights full"):
        resolve_weights("blocks", cpu, torch.bfloat16)


@needs_blocks
def test_a_model_not_made_of_blocks_loads_fp16_on_auto_and_fails_clearly_on_blocks(lm, tmp_path):
    from workers.engine.runtime.model import ModelLoadError, load_model

    tiny_llama().to(torch.float32).save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    assert load_model(str(tmp_path), "cpu", "float32", tmp_path / "cache").weights == "fp16"
    with pytest.raises(ModelLoadError, match="--weights blocks: model.layers.0.self_attn.q_proj's weights are not exact .*; use --weights fp16"):
        load_model(str(tmp_path), "cpu", "float32", tmp_path / "cache", weights="blocks")


@needs_fp16
def test_the_packaged_model_loads_as_its_blocks_and_hf_generate_runs_stock(lm):
    from dare.benchmarks.reference import hf_generate

    forward = lm.steps.forward
    kernels_used = forward.linears.kernels()
    assert len(kernels_used) == 30 * 4 + 1  # q/k/v, o, gate/up and down a layer, and the head
    if kernels.unavailable() is None:  # the GGUF's weights are blocks, all of them
        assert lm.weights == "blocks" and "Q4_1/Q8_0 block weights" in lm.describe()
        assert {k.blocks.kind for k in kernels_used if isinstance(k, BlockKernel)} == {"q4_1", "q8_0"}
        assert not any(isinstance(k, FullKernel) for k in kernels_used[-1:])  # the head too
    # the model's own modules are stock nn.Linear on the weights as loaded: `generate` runs them
    assert all(type(m) is torch.nn.Linear for m in lm.model.modules() if isinstance(m, torch.nn.Linear))
    assert len(hf_generate(lm, [1, 2, 3], 2).token_ids) <= 2
