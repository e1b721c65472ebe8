"""The lean forward (lean.py) on tiny float64 models of each family it serves: the same logits as
transformers' forward through the engine's cache and masks, and strict decoding = transformers' greedy;
`engine_forward` picks it by the model's family."""

import copy
import random

import pytest
import torch
import transformers

from tests.device_model import ModelledDevice
from tests.test_blocks import as_blocks
from tests.test_engine import EOS, VOCAB, decode, greedy, random_pools, tiny_llama
from tests.test_weights import KINDS, stock_tiny
from workers.engine.algorithm.accept import Acceptance
from workers.engine.algorithm.budget import Budget
from workers.engine.algorithm.cost import CostModel
from workers.engine.algorithm.draft import DraftConfig, RetrievalDrafter
from workers.engine.backends.batch import BatchDecoder
from workers.engine.runtime import kernels
from workers.engine.runtime.cache import SlotCache
from workers.engine.runtime.forward import TransformersForward, additive, ancestor_matrix, causal_mask, engine_forward
from workers.engine.runtime.lean import LeanForward
from workers.engine.runtime.steps import StepForward
from workers.engine.runtime.weights import Projection, full_kernels, linear_kernels


def tiny(family):
    if family == "llama":
        return tiny_llama()
    torch.manual_seed(1)
    config_class, model_class = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS, bos_token_id=0, pad_token_id=0)
    model = model_class(config).to(torch.float64).eval()
    model.lm_head.weight.data *= 8
    model.generation_config.eos_token_id = EOS
    return model


def tree_step_logits(forward, prompt, parents, tokens):
    """Prefill `prompt` into a fresh cache, then one tree step, through `forward`; the step's logits."""
    model = forward.model
    cache, dtype = SlotCache(model), next(model.parameters()).dtype
    cache.reserve(1, 64)
    n = len(prompt) - 1
    cache.prepare(0, torch.arange(n)[None], n)
    forward(cache, torch.tensor([prompt[:-1]]), torch.arange(n)[None], causal_mask(n, 0, dtype))
    width = len(tokens) + 1
    depths = [0] * width
    for i, p in enumerate(parents, start=1):
        depths[i] = depths[p + 1] + 1
    positions = torch.tensor([[n + d for d in depths]])
    visible = torch.zeros((width, n + width), dtype=torch.bool)
    visible[:, :n] = True
    visible[:, n:] = ancestor_matrix(parents)
    cache.prepare(0, (n + torch.arange(width))[None], n + width)  # node i at column n + i, as the engine writes it
    return forward(cache, torch.tensor([[prompt[-1], *tokens]]), positions, additive(visible, dtype)[None, None])


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_lean_logits_equal_transformers_logits(family):
    model = tiny(family)
    prompt, parents, tokens = [5, 9, 13, 2, 7], [-1, 0, 0, 2], [11, 4, 30, 6]
    stock = tree_step_logits(TransformersForward(model), prompt, parents, tokens)
    fast = engine_forward(model)
    assert isinstance(fast, LeanForward) and fast.name == "lean"
    torch.testing.assert_close(tree_step_logits(fast, prompt, parents, tokens), stock, atol=1e-10, rtol=1e-10)


def test_strict_with_the_lean_forward_equals_transformers_greedy():
    model = tiny_llama()
    rng = random.Random(8)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(6)]
    pools = random_pools(model, rng, prompts)
    accepted = 0
    for prompt in prompts:
        out = decode(model, prompt, pools, "strict", n=30, config=DraftConfig(max_nodes=16, max_depth=8), forward=LeanForward(model))
        assert out.token_ids == greedy(model, prompt, 30)  # transformers' own generate: never the lean forward
        accepted += sum(out.stats.accepted) - out.stats.steps
    assert accepted > 0


def test_other_families_keep_transformers_forward():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4))
    assert isinstance(engine_forward(model), TransformersForward)
    with pytest.raises(ValueError, match="no lean forward for GPT2LMHeadModel"):
        LeanForward(model)


@pytest.mark.parametrize("glue", [False, True], ids=["torch glue", "C++ glue"])
@pytest.mark.parametrize("kind", KINDS)
def test_lean_forward_on_packed_weights_fuses_them_and_decodes_its_own_greedy(kind, glue, tmp_path):
    if glue and kernels.unavailable():
        pytest.skip(f"no CPU kernels here: {kernels.unavailable()}")
    model = stock_tiny(kind)
    prompt, parents, tokens = [5, 9, 13, 2, 7], [-1, 0, 0, 2], [11, 4, 30, 6]
    same_weights = copy.deepcopy(model)  # the weights the kernels use: fp16 rounds them, blocks are exact
    for m in same_weights.modules():
        if isinstance(m, torch.nn.Linear) and kind == "fp16":
            m.weight.data = m.weight.data.half().float()
    stock = tree_step_logits(TransformersForward(same_weights), prompt, parents, tokens)  # transformers' forward
    fast = engine_forward(model, linear_kernels(model, kind, tmp_path), kernels.library(tmp_path) if glue else None)
    assert (fast.glue is not None) == glue and fast.name == ("lean+glue" if glue else "lean")
    assert all(type(f.kernel) is type(fast.linears.head.kernel) for f in fast.linears.qkv)  # fused in kind
    torch.testing.assert_close(tree_step_logits(fast, prompt, parents, tokens), stock, atol=1e-4, rtol=1e-4)
    rng = random.Random(2)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(4)]
    pools = random_pools(model, rng, prompts)
    for prompt in prompts:
        assert decode(model, prompt, pools, "strict", n=30, forward=fast).token_ids == greedy(model, prompt, 30)


def head_size_64_blocks():
    """A tiny float32 Llama with head size 64 (the C++ attention's), weights exactly block-representable."""
    torch.manual_seed(4)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                      eos_token_id=EOS, bos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.lm_head.weight.data *= 8
    model.generation_config.eos_token_id = EOS
    return as_blocks(model)


@pytest.mark.skipif(kernels.unavailable() is not None, reason=f"no CPU kernels here: {kernels.unavailable()}")
def test_the_glued_lean_forward_attends_in_cpp_at_head_size_64(tmp_path, monkeypatch):
    model = head_size_64_blocks()
    prompt, parents, tokens = [5, 9, 13, 2, 7], [-1, 0, 0, 2], [11, 4, 30, 6]
    stock = tree_step_logits(TransformersForward(model), prompt, parents, tokens)
    ran = []
    attention = kernels.attention
    monkeypatch.setattr(kernels, "attention", lambda *args: ran.append(attention(*args)) or ran[-1])
    glued = LeanForward(model, linear_kernels(model, "blocks", tmp_path), kernels.library(tmp_path))
    fast = tree_step_logits(glued, prompt, parents, tokens)
    assert len(ran) == 2 * 2 and all(out is not None for out in ran)  # prefill and step, both layers: none fell back to SDPA
    torch.testing.assert_close(fast, stock, atol=1e-4, rtol=1e-4)
    rng = random.Random(5)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(4)]
    pools = random_pools(model, rng, prompts)
    for prompt in prompts:
        assert decode(model, prompt, pools, "strict", n=30, forward=glued).token_ids == greedy(model, prompt, 30)


@pytest.mark.skipif(kernels.unavailable() is not None, reason=f"no CPU kernels here: {kernels.unavailable()}")
def test_a_packed_step_gives_each_real_token_the_bits_of_the_padded_step(tmp_path):
    """Rows verifying 5, 1 and 3 tokens of a 5-wide step: the packed forward computes 9 tokens, not 15; each
    real token's logits and cached keys/values are those of the padded step, bit for bit."""
    model = head_size_64_blocks()
    glued = LeanForward(model, linear_kernels(model, "blocks", tmp_path), kernels.library(tmp_path))
    assert glued.packs
    rng = random.Random(8)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(n)] for n in (7, 12, 4)]
    cache = SlotCache(model)
    cache.reserve(3, 64)
    for row, prompt in enumerate(prompts):
        cache.prepare(row, torch.arange(len(prompt))[None], len(prompt))
        glued(cache, torch.tensor([prompt]), torch.arange(len(prompt))[None], causal_mask(len(prompt), 0, torch.float32))
    counts, width, span = [5, 1, 3], 5, 12 + 5
    ids = torch.tensor([[rng.randrange(2, VOCAB) for _ in range(width)] for _ in prompts])
    lengths = torch.tensor([len(p) for p in prompts])
    positions = lengths[:, None] + torch.arange(width)[None]
    visible = torch.arange(span)[None, None, :] < lengths[:, None, None]
    visible = visible.repeat(1, width, 1)
    for b, n in enumerate(counts):  # a chain of n real tokens; padding sees itself only
        visible[b, :, lengths[b] : lengths[b] + width] = torch.eye(width, dtype=torch.bool)
        visible[b, :n, lengths[b] : lengths[b] + n] = torch.ones(n, n, dtype=torch.bool).tril()
    mask = additive(visible, torch.float32)[:, None]
    before = cache.data.clone()
    cache.prepare(0, positions, span)
    padded = glued(cache, ids, positions, mask)
    padded_cache = cache.data.clone()
    cache.data.copy_(before)
    cache.prepare(0, positions, span)
    packed = glued(cache, ids, positions, mask, counts=counts).split(counts)
    for b, n in enumerate(counts):
        assert torch.equal(packed[b], padded[b, :n]), f"row {b}"
        written = slice(0, int(lengths[b]) + n)
        assert torch.equal(cache.data[:, :, b, :, written], padded_cache[:, :, b, :, written]), f"row {b}'s cache"


def add_two_strict_rows(decoder, step, prompts, pools):
    """Rows 2 * step and 2 * step + 1 join, strict, drafting from every pool, 30 new tokens."""
    for i in (2 * step, 2 * step + 1):
        drafter = RetrievalDrafter([(p, 1.0) for p in pools], DraftConfig(), prompt=prompts[i])
        decoder.add(i, prompts[i], drafter, Budget(CostModel.flat()), Acceptance("strict"), 30)


@pytest.mark.skipif(kernels.unavailable() is not None, reason=f"no CPU kernels here: {kernels.unavailable()}")
def test_strict_rows_of_a_packed_batch_equal_their_own_greedy_decoding(tmp_path, monkeypatch):
    """Several rows drafting trees of different sizes, joining at different steps, through the packed forward:
    every row's strict output is its own greedy decoding, and steps did pack."""
    model = head_size_64_blocks()
    glued = LeanForward(model, linear_kernels(model, "blocks", tmp_path), kernels.library(tmp_path))
    packed_steps = []
    packed = glued.packed
    monkeypatch.setattr(glued, "packed", lambda *args: packed_steps.append(args[-1]) or packed(*args))
    rng = random.Random(6)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(2, 20))] for _ in range(6)]
    pools = random_pools(model, rng, prompts)
    decoder = ModelledDevice.following(CostModel.flat()).attach(BatchDecoder(model, {EOS}, rows=4, steps=StepForward(glued)))
    results, step = {}, 0
    while step < 3 or len(decoder):
        if step < 3:
            add_two_strict_rows(decoder, step, prompts, pools)
        results.update({f.key: f for f in decoder.step()})
        step += 1
    assert any(len(set(counts)) > 1 for counts in packed_steps)
    for i, prompt in enumerate(prompts):
        assert results[i].token_ids == greedy(model, prompt, 30), f"row {i}"


@pytest.mark.skipif(kernels.unavailable() is not None, reason=f"no CPU kernels here: {kernels.unavailable()}")
def test_prefill_in_chunks_spread_over_steps_changes_no_strict_row(tmp_path):
    """Prompts prefilled in chunks of 3 tokens (on other weights, as the engine's prefill runs on MKL), a chunk
    between steps while other rows decode: every strict row is its own greedy decoding, token for token what a
    decoder that prefills every joining prompt whole gives."""
    model = head_size_64_blocks()
    rng = random.Random(8)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(16, 40))] for _ in range(8)]
    pools = random_pools(model, rng, prompts)

    def decode_all(per_step):
        glued = LeanForward(model, linear_kernels(model, "blocks", tmp_path), kernels.library(tmp_path),
                            prefill=full_kernels, prefill_chunk=3)
        decoder = BatchDecoder(model, {EOS}, rows=4, steps=StepForward(glued), prefill_per_step=per_step)
        results, step, overlapping = {}, 0, 0
        while step < 4 or len(decoder):
            if step < 4:
                add_two_strict_rows(decoder, step, prompts, pools)
            results.update({f.key: f for f in decoder.step()})
            overlapping += bool(decoder.rows and decoder.filling)  # rows decoded while others were half prefilled
            step += 1
        return results, overlapping

    spread, overlapping = decode_all(3)
    whole, none = decode_all(0)
    assert overlapping >= 2 and none == 0
    for i, prompt in enumerate(prompts):
        assert spread[i].token_ids == whole[i].token_ids == greedy(model, prompt, 30), f"row {i}"
        assert spread[i].stats.prefill_s > 0


def test_a_projection_equals_the_layers_it_joins():
    torch.manual_seed(3)
    layers = [torch.nn.Linear(16, n, bias=b).double() for n, b in ((16, True), (8, False), (8, True))]
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    for got, layer in zip(Projection(layers)(x), layers):
        torch.testing.assert_close(got, layer(x), atol=1e-12, rtol=1e-12)
