"""DARE inside vLLM. The first tests need only the engine's pure parts (every environment); the ones
marked `vllm` run a real vLLM engine (the `vllm` extra: `make test` installs it into .venv-vllm and
runs them there) on a tiny random Llama, float32, eager."""

from __future__ import annotations

import base64
import os
import random
import signal
from pathlib import Path

import pytest
import torch

from workers.engine.algorithm.accept import Acceptance
from workers.engine.algorithm.cost import CostModel
from workers.engine.algorithm.draft import DraftTree
from workers.engine.algorithm.trie import Pool
from workers.engine.backends.vllm import best_chain, chain_tokens, dare_args

VOCAB = 512


def test_best_chain_follows_the_best_child_in_pop_order():
    # root children: a (0.9), b (0.5); a's children: c (0.6), d (0.2); c's child: e (0.3)
    tree = DraftTree(tokens=[10, 11, 12, 13, 14], parents=[-1, -1, 0, 0, 2], depths=[1, 1, 2, 2, 3],
                     scores=[0.9, 0.5, 0.6, 0.2, 0.3])
    assert best_chain(tree, 8) == ([10, 12, 14], [0.9, 0.6, 0.3])
    assert best_chain(tree, 2) == ([10, 12], [0.9, 0.6])
    assert best_chain(DraftTree(), 8) == ([], [])


def _logits(rows: list[dict[int, float]]) -> torch.Tensor:
    """Logits whose softmax puts the given probabilities on the given tokens (the rest spread thin)."""
    out = torch.full((len(rows), VOCAB), -30.0)
    for i, probs in enumerate(rows):
        for token, p in probs.items():
            out[i, token] = torch.log(torch.tensor(p))
    return out


def test_chain_tokens_strict_and_relaxed_on_known_logits():
    # position 0: argmax 5 (0.6), 7 second (0.3); position 1: argmax 8 (0.85), 9 (0.12); position 2: 4 (0.95)
    logits = _logits([{5: 0.6, 7: 0.3, 3: 0.05}, {8: 0.85, 9: 0.12}, {4: 0.95}])
    strict, relaxed = Acceptance("strict"), Acceptance("relaxed", top_k=2, min_prob=0.1)
    assert chain_tokens(logits, [5, 8], strict) == [5, 8, 4]  # all accepted, then the bonus
    assert chain_tokens(logits, [7, 9], strict) == [5]  # first draft rejected: the argmax
    assert chain_tokens(logits, [7, 9], relaxed) == [7, 9, 4]  # both second-best with p > 0.1
    assert chain_tokens(logits, [3, 8], relaxed) == [5]  # 3 is third (and p 0.05): rejected
    low = _logits([{5: 0.9, 7: 0.08}, {8: 0.9}])
    assert chain_tokens(low, [7], relaxed) == [5]  # in the top 2, but p 0.08 <= 0.1
    assert chain_tokens(logits, [], relaxed) == [5]


def test_request_args():
    assert dare_args("relaxed", id="r1") == {"dare": {"mode": "relaxed", "id": "r1"}}
    with pytest.raises(ValueError, match="mode must be one of"):
        dare_args("fast")


# --- a real vLLM engine -------------------------------------------------------------------------

vllm_only = pytest.mark.vllm


def _needs_vllm() -> None:
    pytest.importorskip("vllm", reason="needs the vllm extra (`make install-vllm`; `make test` runs these in .venv-vllm)")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved as a Hugging Face directory (float32 safetensors), no tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=1, bos_token_id=0, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.lm_head.weight.data *= 12  # peaked distributions, like a trained model's
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engines(tiny_dir: Path):
    """vLLM's own greedy engine and the DARE engine, both in this process, over the same pools."""
    _needs_vllm()
    from workers.engine.backends.vllm import VllmEngine

    pools = {"s": Pool(depth=20)}
    common = {"max_model_len": 512, "tokenizer": False, "max_num_seqs": 16}
    greedy = VllmEngine(str(tiny_dir), "greedy", **common)
    dare = VllmEngine(str(tiny_dir), "dare", k=6, cost=CostModel.flat(), **common)
    return greedy, dare, pools


def _run(engine, prompts, mode, n, pools=(), batched=True):
    """Finished requests in prompt order (keys: the prompts' positions)."""
    if batched:
        for key, p in enumerate(prompts):
            engine.add(key, p, n, mode, pools)
        return sorted(engine.run(), key=lambda f: f.key)
    out = []
    for key, p in enumerate(prompts):
        engine.add(key, p, n, mode, pools)
        out.extend(engine.run())
    return out


def _accepted(finished) -> int:
    """Draft tokens accepted over the requests."""
    return sum(sum(f.stats.accepted) - f.stats.steps for f in finished)


def _drafted(finished) -> int:
    return sum(sum(f.stats.drafted) for f in finished)


@vllm_only
@pytest.mark.parametrize("batched", [False, True])
def test_strict_in_vllm_equals_vllm_greedy(engines, batched):
    greedy, dare, pools = engines
    rng = random.Random(7)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(3, 40))] for _ in range(6)]
    reference = [f.token_ids for f in _run(greedy, prompts, "ar", 40, batched=batched)]
    segment = pools["s"]
    for n, (prompt, out) in enumerate(zip(prompts, reference)):  # continuations of the prompts (drafts pass) and noise
        segment.add(f"g{n}", prompt[-4:] + out[: 20 + n])
        segment.add(f"r{n}", [rng.randrange(2, VOCAB) for _ in range(30)])
    strict = _run(dare, prompts, "strict", 40, [(segment, 1.0)], batched=batched)
    assert [f.token_ids for f in strict] == reference
    assert _accepted(strict) > 20, "drafts were accepted (the pools reached the proposer)"
    assert _drafted(strict) > _accepted(strict), "and some were rejected"
    for n in range(len(prompts)):
        segment.remove(f"g{n}")
        segment.remove(f"r{n}")


@vllm_only
def test_pools_reach_the_proposer_live(engines):
    greedy, dare, pools = engines
    prompt = list(range(100, 130))
    [reference] = [f.token_ids for f in _run(greedy, [prompt], "ar", 48)]
    segment = [(pools["s"], 1.0)]
    [before] = _run(dare, [prompt], "strict", 48, segment)
    pools["s"].add("live", prompt[-4:] + reference)  # a pool update after the engine started
    [after] = _run(dare, [prompt], "strict", 48, segment)
    [elsewhere] = _run(dare, [prompt], "strict", 48, [(Pool(depth=20), 1.0)])
    assert before.token_ids == after.token_ids == elsewhere.token_ids == reference
    assert _accepted([after]) >= 30 and after.stats.steps <= 17, (_accepted([after]), after.stats.steps)
    assert _accepted([elsewhere]) < _accepted([after]) and _accepted([before]) < _accepted([after])
    pools["s"].remove("live")


@vllm_only
def test_relaxed_in_vllm_emits_only_tokens_the_rule_allows(engines, tiny_dir):
    from transformers import LlamaForCausalLM

    greedy, dare, pools = engines
    rng = random.Random(3)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(20)] for _ in range(4)]
    reference = [f.token_ids for f in _run(greedy, prompts, "ar", 32)]
    segment = pools["s"]
    for n, (prompt, out) in enumerate(zip(prompts, reference)):  # plausible but not greedy continuations
        segment.add(f"v{n}", prompt[-4:] + [t if i % 5 else rng.randrange(2, VOCAB) for i, t in enumerate(out)])
    relaxed = _run(dare, prompts, "relaxed", 32, [(segment, 1.0)])
    model = LlamaForCausalLM.from_pretrained(tiny_dir).eval()
    for prompt, out in zip(prompts, relaxed):
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            probs = model(ids).logits[0, len(prompt) - 1 : -1].softmax(-1)
        for position, token in enumerate(out.token_ids):
            p = probs[position]
            top2 = p.topk(2).indices.tolist()
            assert token == int(p.argmax()) or (token in top2 and float(p[token]) > 0.1 - 1e-4), (position, token)
    assert _accepted(relaxed) > 0
    for n in range(len(prompts)):
        segment.remove(f"v{n}")


# vLLM 0.32 starts at most two engines in one process: the `suffix` engine runs in a child.
SUFFIX_RUN = """
import json, sys
from workers.engine.backends.vllm import VllmEngine
engine = VllmEngine(sys.argv[1], "suffix", max_model_len=512, tokenizer=False, max_num_seqs=16)
prompts, answers = json.loads(sys.argv[2]), json.loads(sys.argv[3])

def run(prompt):
    engine.add(0, prompt, 40)
    steps = 0
    while engine.engine.has_unfinished_requests():
        [done] = engine.step() or [None]
        steps += 1
    return {"tokens": done.token_ids, "steps": steps}

runs = {"first": [run(p) for p in prompts]}  # the cache fills with these answers
engine.seed_suffix_cache([])
runs["forgotten"] = [run(p) for p in prompts]
engine.seed_suffix_cache(answers)
runs["seeded"] = [run(p) for p in prompts]
open(sys.argv[4], "w").write(json.dumps(runs))
"""


@vllm_only
def test_vllm_suffix_baseline_equals_greedy_and_its_cache_is_reset(engines, tiny_dir, tmp_path):
    """The bench's `vllm-suffix` baseline (vLLM's suffix decoding; `make install-vllm` builds arctic-inference):
    exact greedy tokens; `seed_suffix_cache` forgets earlier answers (a second pass decodes in exactly as many
    steps as the first) and caches the given ones (prompts whose answers it holds decode in a few steps)."""
    pytest.importorskip("arctic_inference", reason="vLLM's suffix drafter needs arctic-inference (`make install-vllm`)")
    import json
    import subprocess
    import sys

    greedy, _, _ = engines
    rng = random.Random(11)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(5, 30))] for _ in range(3)]
    reference = [f.token_ids for f in _run(greedy, prompts, "ar", 40, batched=False)]
    out = tmp_path / "suffix.json"
    subprocess.run([sys.executable, "-c", SUFFIX_RUN, str(tiny_dir), json.dumps(prompts), json.dumps(reference), str(out)],
                   check=True, timeout=600)
    runs = json.loads(out.read_text())
    for name in ("first", "forgotten", "seeded"):
        assert [r["tokens"] for r in runs[name]] == reference, name
    assert [r["steps"] for r in runs["forgotten"]] == [r["steps"] for r in runs["first"]]
    seeded = sum(r["steps"] for r in runs["seeded"])
    assert seeded * 3 < sum(map(len, reference)) and seeded < sum(r["steps"] for r in runs["first"]), runs


@vllm_only
@pytest.mark.integration
def test_vllm_worker_sigkill_mid_backlog_then_restart_loses_nothing(kafka_settings, model_cache, lm):
    """The Kafka contract of `dare worker --backend vllm` (SmolLM2, eager vLLM, continuous batching): a
    malformed prompt is dead-lettered, a SIGKILL mid-backlog loses nothing, the restart answers the rest."""
    _needs_vllm()
    from infra.kafka import make_producer
    from infra.reader import read_topic
    from schemas import DeadLetter, Topics, decode
    from tests.test_worker_faults import answered, produce_backlog, start_worker, wait_for

    ids = produce_backlog(kafka_settings)
    producer = make_producer(kafka_settings, "test")
    producer.send(Topics(kafka_settings.topic_prefix).prompts, key=b"bad", value=b"{not json")
    producer.flush()
    producer.close()
    args = ("--backend", "vllm", "--eager", "--batch", "8", "--mode", "relaxed")
    worker = start_worker(kafka_settings, model_cache, *args)
    try:
        assert wait_for(lambda: len(answered(kafka_settings)) >= 4, 300), "the vLLM worker answered nothing"
        os.killpg(worker.pid, signal.SIGKILL)  # mid-batch, no goodbye
        worker.wait(10)
        worker = start_worker(kafka_settings, model_cache, *args, "--idle-exit", "8")
        assert worker.wait(400) == 0
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
    counts = answered(kafka_settings)
    assert set(ids) <= set(counts), f"lost: {sorted(set(ids) - set(counts))}"
    dead = [decode(DeadLetter, r.value) for r in read_topic(kafka_settings, Topics(kafka_settings.topic_prefix).dead_letter, timeout_s=3)]
    assert dead and {base64.b64decode(d.value_b64) for d in dead} == {b"{not json"}
    print(f"\n[faults] vLLM worker, SIGKILL + restart: {len(ids)} prompts, {sum(counts.values()) - len(counts)} duplicates")
