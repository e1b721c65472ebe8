"""The DARE engine on a tiny randomly initialised Llama (float64, so near-ties cannot flip)."""

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from workers.engine.algorithm.accept import Acceptance, accept
from workers.engine.algorithm.budget import Budget, allocate
from workers.engine.algorithm.cost import CostModel, cached_cost, plausible
from workers.engine.algorithm.draft import DraftConfig, DraftTree, NoDrafter, RetrievalDrafter, build_draft
from workers.engine.algorithm.trie import LiveText, Pool
from workers.engine.backends.batch import BatchDecoder
from workers.engine.runtime.forward import ancestor_matrix
from workers.engine.runtime.steps import StepForward

VOCAB = 48
EOS = 1


class IdsTokenizer:
    """Text layer for a model without a real vocabulary: token ids as words."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"w{i}" for i in ids)

    def encode(self, text, add_special_tokens=False):
        return [int(w[1:]) for w in text.split()]


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=EOS, bos_token_id=0, pad_token_id=0,
    )
    model = LlamaForCausalLM(config).to(torch.float64).eval()
    model.lm_head.weight.data *= 8  # peaked distributions, like a trained model's
    model.generation_config.eos_token_id = EOS
    return model


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def greedy(model, prompt, n, eos=True):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=EOS if eos else None, pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    return new[: new.index(EOS)] if EOS in new else new


def decode(model, prompt, pools, mode="strict", n=40, config=None, cost=None, forward=None):
    """One request alone: a batch of one (through `forward`, if given, else the model's `engine_forward`)."""
    drafter = RetrievalDrafter([(p, 1.0) for p in pools], config or DraftConfig(), prompt=prompt)
    decoder = BatchDecoder(model, {EOS}, steps=StepForward(forward) if forward else None)
    decoder.add("only", prompt, drafter, Budget(cost or CostModel.flat()), Acceptance(mode), n)
    finished = []
    while not finished:
        finished = decoder.step()
    return finished[0]


# ---------------------------------------------------------------------------- pool


def test_pool_counts_continuations_and_finds_longest_suffixes():
    pool = Pool(depth=4)
    pool.add("a", [5, 6, 7, 8])
    pool.add("b", [5, 6, 9])
    matches = dict(pool.lookup([3, 5, 6], max_key=3))
    assert set(matches) == {1, 2}  # "6" and "5 6" match; "3 5 6" does not
    node = matches[2]
    assert node[0] == 2 and {t: c[0] for t, c in node[1].items()} == {7: 1, 9: 1}


def test_pool_removal_and_eviction_keep_the_node_count_exact():
    pool = Pool(depth=3, max_nodes=10_000)
    pool.add("a", [1, 2, 3, 4])
    one = pool.nodes
    pool.add("b", [2, 3, 5])
    pool.remove("b")
    assert pool.nodes == one
    pool.remove("a")
    assert pool.nodes == 0 and pool.root[1] == {}

    capped = Pool(depth=3, max_nodes=12)
    for n in range(6):
        capped.add(f"t{n}", [10 * n + 1, 10 * n + 2, 10 * n + 3])  # 6 nodes each
    assert capped.nodes <= 12 and list(capped.texts) == ["t4", "t5"]
    assert capped.evicted == 4


def test_readding_a_text_id_replaces_it():
    pool = Pool(depth=3)
    pool.add("a", [1, 2, 3])
    pool.add("a", [1, 2, 4])
    assert dict(pool.lookup([1, 2], 2))[2][1].keys() == {4}


def test_live_text_sees_only_earlier_occurrences():
    live = LiveText(depth=4)
    live.extend([7, 8, 9, 7, 8])
    matches = dict(live.lookup([7, 8], max_key=2))
    assert {t: c[0] for t, c in matches[2][1].items()} == {9: 1}  # the continuation of the first "7 8"


# ---------------------------------------------------------------------------- draft


def test_draft_tree_is_best_first_and_ancestor_closed():
    pool = Pool(depth=8)
    for n in range(20):
        rng = random.Random(n)
        pool.add(str(n), [1, 2] + [rng.randrange(3, 9) for _ in range(10)])
    tree = build_draft([1, 2], [(pool, 1.0)], DraftConfig(max_nodes=30, max_depth=4))
    assert 0 < len(tree) <= 30 and max(tree.depths) <= 4
    for i, parent in enumerate(tree.parents):
        assert parent < i
        assert tree.depths[i] == (1 if parent < 0 else tree.depths[parent] + 1)
        if parent >= 0:
            assert tree.scores[i] <= tree.scores[parent] + 1e-12
    assert tree.scores == sorted(tree.scores, reverse=True)


def test_each_draft_node_names_the_source_that_gave_it_most_of_its_score():
    segment, shared = Pool(depth=8, label="segment"), Pool(depth=8, label="global")
    for n in range(3):
        segment.add(f"s{n}", [1, 2, 3, 4, 5])  # after 1 2: 3 4 5, three times
    shared.add("g", [1, 2, 6, 7])  # after 1 2: 6 7, once
    tree = build_draft([1, 2], [(segment, 1.0), (shared, 1.0)], DraftConfig())
    by_token = dict(zip(tree.tokens, tree.sources, strict=True))
    assert by_token[3] == by_token[4] == "segment" and by_token[6] == by_token[7] == "global"
    assert tree.prefix(2).sources == tree.sources[:2]
    own = Pool(depth=8, label="own")
    for n in range(5):
        own.add(f"o{n}", [1, 2, 3])  # 3 after 1 2 in both: most of its score now comes from `own`
    mixed = build_draft([1, 2], [(segment, 0.1), (own, 1.0)], DraftConfig())
    assert dict(zip(mixed.tokens, mixed.sources, strict=True))[3] == "own"


def test_a_decode_counts_its_drafts_by_source_and_they_add_up(tiny):
    rng = random.Random(4)
    prompt = [rng.randrange(2, VOCAB) for _ in range(8)]
    truth = greedy(tiny, prompt, 30, eos=False)
    segment = Pool(depth=12, label="segment")
    segment.add("t", prompt[-3:] + truth)
    out = decode(tiny, prompt, [segment], n=30)
    s = out.stats
    assert set(s.drafted_by) <= {"segment", "own"} and s.drafted_by.get("segment", 0) > 0
    assert sum(s.drafted_by.values()) == sum(s.drafted) and sum(s.accepted_by.values()) == sum(s.accepted) - s.steps
    assert all(s.accepted_by.get(k, 0) <= n for k, n in s.drafted_by.items())


def test_empty_pool_gives_an_empty_draft():
    assert len(build_draft([1, 2, 3], [(Pool(), 1.0)], DraftConfig())) == 0


# ---------------------------------------------------------------------------- verify


def test_ancestor_matrix_of_a_hand_built_tree():
    #   pending ─ a(0) ─ b(1)
    #           └ c(2)
    assert ancestor_matrix([-1, 0, -1]).int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]]


# ---------------------------------------------------------------------------- accept


def test_strict_and_relaxed_acceptance_on_known_logits():
    tree = DraftTree(tokens=[5, 6, 7], parents=[-1, -1, 0], depths=[1, 1, 2], scores=[1, 1, 1])
    logits = torch.full((4, 10), -10.0)
    logits[0, 6], logits[0, 5] = 2.0, 1.9  # root: argmax 6, 5 is a close second
    logits[1, 7] = 3.0  # after 5: 7
    logits[2, 9] = 3.0  # after 6: 9
    logits[3, 4] = 3.0  # after 5 7: 4
    assert accept(logits, tree, Acceptance("strict")) == ([2], 9)
    # relaxed: both 5 and 6 qualify at the root; 6 is more probable, so 6 is taken
    assert accept(logits, tree, Acceptance("relaxed")) == ([2], 9)
    logits[0, 6] = 1.8  # now 5 is the argmax and qualifies
    assert accept(logits, tree, Acceptance("relaxed")) == ([1, 3], 4)
    assert accept(logits, tree, Acceptance("relaxed", min_prob=0.99)) == ([1, 3], 4)  # the argmax is always taken
    only_six = DraftTree(tokens=[6], parents=[-1], depths=[1], scores=[1])  # 6 is second at the root, p ~ 0.47
    assert accept(logits[:2], only_six, Acceptance("relaxed")) == ([1], 7)
    assert accept(logits[:2], only_six, Acceptance("relaxed", min_prob=0.6)) == ([], 5)
    assert accept(logits[:2], only_six, Acceptance("relaxed", top_k=1)) == ([], 5)


def test_the_relaxed_guard_keeps_the_models_own_token_where_it_is_sure():
    only_six = DraftTree(tokens=[6], parents=[-1], depths=[1], scores=[1])
    logits = torch.full((2, 10), -10.0)
    logits[0, 5], logits[0, 6] = 3.0, 1.2  # argmax 5 at p ~ 0.86, 6 second at p ~ 0.14
    logits[1, 7] = 3.0
    assert accept(logits, only_six, Acceptance("relaxed")) == ([1], 7)  # no guard: 6 passes top-2 and p > 0.1
    assert accept(logits, only_six, Acceptance("relaxed", max_top1=0.8)) == ([], 5)  # the model is sure: its own token
    assert accept(logits, only_six, Acceptance("relaxed", max_top1=0.9)) == ([1], 7)  # unsure enough: relaxed as before
    sure_of_six = DraftTree(tokens=[5], parents=[-1], depths=[1], scores=[1])
    assert accept(logits, sure_of_six, Acceptance("relaxed", max_top1=0.5)) == ([1], 7)  # the argmax itself is always taken


# ---------------------------------------------------------------------------- decode


def random_pools(model, rng, prompts):
    """Pools holding other prompts' greedy continuations (so drafts get accepted) and noise."""
    pool = Pool(depth=12)
    for n, other in enumerate(prompts):
        pool.add(f"g{n}", greedy(model, other, 30, eos=False))
        pool.add(f"r{n}", [rng.randrange(2, VOCAB) for _ in range(30)])
    return [pool]


@pytest.mark.parametrize("seed", range(6))
def test_strict_equals_greedy_on_a_tiny_llama(tiny, seed):
    rng = random.Random(seed)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(8)]
    pools = random_pools(tiny, rng, prompts)
    config = DraftConfig(max_nodes=rng.choice([4, 16, 64]), max_depth=rng.choice([2, 6, 12]), max_key=rng.choice([1, 3, 8]))
    total_accepted = 0
    for prompt in prompts:
        out = decode(tiny, prompt, pools, "strict", n=30, config=config)
        assert out.token_ids == greedy(tiny, prompt, 30)
        total_accepted += sum(out.stats.accepted) - out.stats.steps
    assert total_accepted > 0  # the drafts were really used


def test_strict_equals_greedy_with_adversarial_trees(tiny):
    """Pools full of near-misses: every draft diverges from greedy after a few tokens."""
    rng = random.Random(99)
    prompt = [5, 9, 13]
    truth = greedy(tiny, prompt, 40, eos=False)
    pool = Pool(depth=16)
    for n in range(40):
        corrupt = list(prompt + truth)
        for _ in range(3):
            corrupt[rng.randrange(len(prompt), len(corrupt))] = rng.randrange(2, VOCAB)
        pool.add(str(n), corrupt)
    out = decode(tiny, prompt, [pool], "strict", n=40, config=DraftConfig(max_nodes=64, max_depth=12))
    assert out.token_ids == greedy(tiny, prompt, 40)


@torch.inference_mode()
def second_choice_walk(model, prompt, n, rng):
    """A continuation that takes the model's second choice now and then: relaxed bait."""
    seq = list(prompt)
    for _ in range(n):
        top = model(torch.tensor([seq])).logits[0, -1].topk(2).indices.tolist()
        seq.append(top[1] if rng.random() < 0.3 else top[0])
    return seq[len(prompt):]


@torch.inference_mode()
def test_relaxed_accepts_only_tokens_within_the_rule(tiny):
    rng = random.Random(5)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(8)] for _ in range(6)]
    pools = random_pools(tiny, rng, prompts)
    for n, prompt in enumerate(prompts):
        pools[0].add(f"walk{n}", prompt + second_choice_walk(tiny, prompt, 30, rng))
    rule = Acceptance("relaxed", top_k=2, min_prob=0.1)
    checked = 0
    for prompt in prompts:
        out = decode(tiny, prompt, pools, "relaxed", n=30)
        seq = prompt + out.token_ids
        probs = torch.softmax(tiny(torch.tensor([seq])).logits[0], -1)  # an independent full forward
        position = len(prompt) - 1
        for emitted in out.stats.accepted:
            for j in range(emitted):
                if position + 1 >= len(seq):
                    break
                token, row = seq[position + 1], probs[position]
                if j == emitted - 1:  # the bonus token: argmax
                    assert token == int(row.argmax())
                else:  # an accepted draft token: the argmax, or in the top k with p > min_prob
                    top = row.topk(rule.top_k).indices.tolist()
                    assert token == top[0] or (token in top and float(row[token]) > rule.min_prob)
                    checked += token != top[0]
                position += 1
    assert checked > 0


def test_stops_at_eos_and_at_the_token_limit(tiny):
    for prompt in ([4, 8, 15], [16, 23, 42], [2, 3]):
        full = greedy(tiny, prompt, 60)
        assert decode(tiny, prompt, [], "strict", n=60).token_ids == full
        assert decode(tiny, prompt, [], "strict", n=7).token_ids == full[:7]


def test_budget_sends_nothing_when_drafts_are_too_costly_and_everything_when_free():
    steep = CostModel({1: 1.0, 2: 2.0, 64: 64.0})
    assert allocate([[0.5] * 10], [1.0], steep) == [0]
    flat = CostModel.flat()
    assert allocate([[0.5] * 10], [1.0], flat) == [10]
    assert allocate([[]], [1.0], flat) == [0]


def test_a_cost_curve_from_a_busy_machine_is_measured_again(tmp_path):
    healthy, busy = CostModel({1: 0.022, 2: 0.024, 8: 0.043, 64: 0.2}), CostModel({1: 0.374, 2: 0.122, 8: 0.17, 64: 3.2})
    assert plausible(healthy) and not plausible(busy) and plausible(CostModel.flat())
    path = tmp_path / "cost.json"
    measured = []

    def measure(*curves):
        queue = list(curves)
        return lambda: measured.append(1) or queue.pop(0)

    assert cached_cost(path, measure(busy, healthy)).seconds == healthy.seconds  # a busy measurement gets a second try
    assert len(measured) == 2
    assert cached_cost(path, measure()).seconds == healthy.seconds  # then read back, not measured
    assert len(measured) == 2
    path.write_text('{"seconds": {"1": 0.374, "2": 0.122, "8": 0.17, "64": 3.2}, "device": "cpu"}')  # stored while busy
    assert cached_cost(path, measure(healthy)).seconds == healthy.seconds and len(measured) == 3


def test_empty_prompt_is_an_error(tiny):
    with pytest.raises(ValueError, match="empty prompt"):
        decode(tiny, [], [], "strict")


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gpt2"])
def test_strict_equals_greedy_on_other_model_families(family):
    """Stock transformers models of other families take the same 4D tree mask."""
    import transformers

    torch.manual_seed(1)
    common = {"vocab_size": VOCAB, "eos_token_id": EOS, "bos_token_id": 0, "pad_token_id": 0}
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, **common)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config_class, model_class = {
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        }[family]
        config = config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, **common)
        model = model_class(config)
    model = model.to(torch.float64).eval()
    model.lm_head.weight.data *= 8
    model.generation_config.eos_token_id = EOS
    rng = random.Random(3)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(2, 12))] for _ in range(4)]
    pools = random_pools(model, rng, prompts)
    for prompt in prompts:
        assert decode(model, prompt, pools, "strict", n=24).token_ids == greedy(model, prompt, 24)


def test_each_mode_maps_to_one_drafter_and_rule_for_every_backend():
    """algorithm/modes.py is the one place a mode becomes a drafter and an acceptance rule."""
    from workers.engine import Strategy

    strategy = Strategy(top_k=3, min_prob=0.2, max_top1=0.7)
    pool = Pool(depth=8)
    assert isinstance(strategy.drafter("ar", [(pool, 1.0)], [1, 2]), NoDrafter) and strategy.rule("ar") == Acceptance("strict")
    assert isinstance(strategy.drafter("strict", [(pool, 1.0)], [1, 2]), RetrievalDrafter) and strategy.rule("strict") == Acceptance("strict")
    assert strategy.rule("relaxed") == Acceptance("relaxed", 3, 0.2, 0.7)
    with pytest.raises(ValueError, match="mode must be one of ar, strict, relaxed"):
        strategy.drafter("greedy", [], None)


def test_open_engine_names_its_backends(tmp_path):
    from workers.engine import open_engine

    with pytest.raises(ValueError, match="backend must be one of transformers, vllm"):
        open_engine("onnx", None, tmp_path)  # type: ignore[arg-type]
