"""Packed fp16 weights (weights.py): a tiny float32 Llama whose linear layers run fbgemm's fp16 GEMM
still decodes strict = its own greedy (batch 1 and batched), `full_weights` gives back the stock
model bit for bit, and the setting resolves or fails with a clear reason."""

import random

import pytest
import torch

from tests.test_batch import join, pools_with_answers, run_to_end
from tests.test_engine import EOS, VOCAB, decode, greedy, random_pools, tiny_llama
from workers.engine.batch import BatchDecoder
from workers.engine.draft import DraftConfig
from workers.engine.weights import PackedLinear, fp16_available, full_weights, pack_linears, resolve_weights

pytestmark = pytest.mark.skipif(fp16_available() is not None, reason=f"packed fp16 weights do not run here: {fp16_available()}")


def tiny_packed():
    model = tiny_llama().to(torch.float32)
    assert pack_linears(model) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the head
    return model


@pytest.fixture(scope="module")
def packed():
    return tiny_packed()


@torch.inference_mode()
def test_packed_logits_are_fp16_weights_and_full_weights_are_the_stock_model(packed):
    stock = tiny_llama().to(torch.float32)
    ids = torch.tensor([[5, 9, 13, 2, 7, 30, 11]])
    reference = stock(ids).logits
    fast = packed(ids).logits
    assert not torch.equal(fast, reference)  # the packed kernel really ran
    torch.testing.assert_close(fast, reference, atol=0.05, rtol=0.01)
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


def test_weights_setting():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_weights("auto", cpu, torch.float32) == "fp16"
    assert resolve_weights("full", cpu, torch.float32) == "full"
    assert resolve_weights("auto", cpu, torch.float64) == "full"
    assert resolve_weights("auto", cuda, torch.bfloat16) == "full"
    with pytest.raises(ValueError, match="float32 activations.*--weights full"):
        resolve_weights("fp16", cpu, torch.bfloat16)
    with pytest.raises(ValueError, match="CPU kernel"):
        resolve_weights("fp16", cuda, torch.float32)


def test_the_packaged_model_loads_packed_and_hf_generate_runs_stock(lm):
    from workers.engine.reference import hf_generate

    assert lm.weights == "fp16" and "fp16 weights" in lm.describe()
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
