"""Lighter weights (weights.py), each kind: a tiny float32 Llama whose linear layers run fbgemm's fp16
GEMM, or the block kernels on weights made of Q4_1/Q8_0 blocks, still decodes strict = its own greedy
(batch 1 and batched); `full_weights` gives back the stock model bit for bit; weights that are not
blocks are refused; the setting resolves or fails with a clear reason."""

import random

import pytest
import torch

from tests.test_batch import join, pools_with_answers, run_to_end
from tests.test_blocks import as_blocks
from tests.test_engine import EOS, VOCAB, decode, greedy, random_pools, tiny_llama
from workers.engine.algorithm.draft import DraftConfig
from workers.engine.backends.batch import BatchDecoder
from workers.engine.runtime import kernels
from workers.engine.runtime.weights import (
    BlockKernel,
    NotBlocksError,
    PackedLinear,
    fp16_available,
    full_weights,
    pack_linears,
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
    model = stock_tiny(request.param)
    assert pack_linears(model, request.param, tmp_path_factory.mktemp("cache")) == 2 * 7 + 1  # 7 a layer, and the head
    return model


@torch.inference_mode()
def test_packed_logits_are_the_kernels_and_full_weights_are_the_stock_model(packed):
    kind = "blocks" if isinstance(packed.lm_head.kernel, BlockKernel) else "fp16"
    stock = stock_tiny(kind)
    ids = torch.tensor([[5, 9, 13, 2, 7, 30, 11]])
    reference = stock(ids).logits
    fast = packed(ids).logits
    if kind == "fp16":  # weights rounded to fp16
        assert not torch.equal(fast, reference)  # the packed kernel really ran
        torch.testing.assert_close(fast, reference, atol=0.05, rtol=0.01)
    else:  # the same weights, only the order of fp32 sums differs
        torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-5)
    with full_weights(packed):
        assert torch.equal(packed(ids).logits, reference)
    assert all(m.active for m in packed.modules() if isinstance(m, PackedLinear))  # switched back on


@pytest.mark.parametrize("seed", range(3))
def test_strict_equals_its_own_greedy_with_packed_weights(packed, seed):
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(6)]
    pools = random_pools(packed, rng, prompts)
    accepted = 0
    for prompt in prompts:
        out = decode(packed, prompt, pools, "strict", n=30, config=DraftConfig(max_nodes=16, max_depth=8))
        assert out.token_ids == greedy(packed, prompt, 30)
        accepted += sum(out.stats.accepted) - out.stats.steps
    assert accepted > 0


def test_batched_strict_rows_equal_their_own_greedy_with_packed_weights(packed):
    rng = random.Random(4)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(2, 30))] for _ in range(7)]
    pool = pools_with_answers(packed, prompts, rng)
    decoder = BatchDecoder(packed, {EOS})
    for i, prompt in enumerate(prompts):
        join(decoder, i, prompt, pool, 30)
    results = run_to_end(decoder)
    for i, prompt in enumerate(prompts):
        assert results[i].token_ids == greedy(packed, prompt, 30), f"row {i}"


@needs_blocks
def test_weights_that_are_not_blocks_are_refused_and_left_alone(tmp_path):
    model = tiny_llama().to(torch.float32)
    with pytest.raises(NotBlocksError, match="lm_head's weights are not exact Q4_1/Q8_0 blocks"):
        pack_linears(model, "blocks", tmp_path)
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


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
    with pytest.raises(ModelLoadError, match="--weights blocks: lm_head's weights are not exact .*; use --weights fp16"):
        load_model(str(tmp_path), "cpu", "float32", tmp_path / "cache", weights="blocks")


@needs_fp16
def test_the_packaged_model_loads_as_its_blocks_and_hf_generate_runs_stock(lm):
    from dare.benchmarks.reference import hf_generate

    if kernels.unavailable() is None:  # the GGUF's weights are blocks, all of them
        assert lm.weights == "blocks" and "Q4_1/Q8_0 block weights" in lm.describe()
        kinds = {m.kernel.blocks.kind for m in lm.model.modules() if isinstance(m, PackedLinear)}
        assert kinds == {"q4_1", "q8_0"}
    layers = [m for m in lm.model.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 30 * 7 + 1
    seen = []
    hook = layers[0].register_forward_pre_hook(lambda m, _: seen.append(m.active))
    try:
        hf_generate(lm, [1, 2, 3], 2)
        with torch.inference_mode():
            lm.model(torch.tensor([[1, 2, 3]]))
    finally:
        hook.remove()
    assert seen[0] is False and seen[-1] is True  # generate: stock weights; the engine's forwards: packed
