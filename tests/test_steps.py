"""Compiled decoding steps (torch.compile) on the tiny float64 Llama: the same tokens as eager greedy,
a bounded number of compilations however long the decode, and the eager path when compiling is off
or fails. (Batch 1 only: with rows joining and leaving, each row count is a graph of its own.)"""

import random

import pytest
import torch

from tests.test_engine import EOS, VOCAB, greedy, random_pools, tiny_llama
from workers.engine.algorithm.accept import Acceptance
from workers.engine.algorithm.budget import Budget
from workers.engine.algorithm.cost import CostModel
from workers.engine.algorithm.draft import DraftConfig, RetrievalDrafter
from workers.engine.backends.batch import BatchDecoder
from workers.engine.runtime.steps import StepForward, resolve_compile


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.fixture(scope="module")
def compiled(tiny):
    return StepForward(tiny, compiled=True)


def decode_all(model, steps, prompts, pools, mode, n, max_nodes=7):
    """Decode `prompts` one after another through one decoder (trees of at most `max_nodes`: widths up to 8)."""
    decoder = BatchDecoder(model, {EOS}, steps=steps)
    outs = []
    for prompt in prompts:
        drafter = RetrievalDrafter([(p, 1.0) for p in pools], DraftConfig(max_nodes=max_nodes), prompt=prompt)
        decoder.add(0, prompt, drafter, Budget(CostModel.flat(), max_tokens=max_nodes), Acceptance(mode), n)
        finished = []
        while not finished:
            finished = decoder.step()
        outs.append(finished[0])
    return outs


def test_compiled_steps_decode_exactly_greedy_and_stop_compiling(tiny, compiled):
    rng = random.Random(3)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(2, 24))] for _ in range(6)]
    pools = random_pools(tiny, rng, prompts)
    outs = decode_all(tiny, compiled, prompts, pools, "strict", 40)
    assert [o.token_ids for o in outs] == [greedy(tiny, p, 40) for p in prompts]
    assert sum(sum(o.stats.drafted) for o in outs) > 0
    assert compiled.compiled, "compilation fell back to eager"
    first = compiled.compiles
    assert 1 <= first <= 4  # widths 1, 2, 4, 8
    outs = decode_all(tiny, compiled, prompts * 3, pools, "relaxed", 40)  # many more steps: nothing new to compile
    assert sum(o.stats.steps for o in outs) > 100
    assert compiled.compiles == first


def test_compiled_steps_pad_widths_to_buckets(compiled):
    assert [compiled.width(n) for n in (1, 2, 3, 5, 9, 17, 33, 64, 65)] == [1, 2, 4, 8, 16, 32, 64, 64, 65]
    eager = StepForward(compiled.forward)
    assert not eager.compiled and [eager.width(n) for n in (1, 3, 65)] == [1, 3, 65]


def test_a_failing_compiler_falls_back_to_eager(tiny, monkeypatch):
    import torch._inductor.compile_fx as inductor

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(inductor, "compile_fx", broken)
    torch._dynamo.reset()
    steps = StepForward(tiny, compiled=True)
    prompt = [5, 9, 13, 2]
    [out] = decode_all(tiny, steps, [prompt], [], "strict", 20)
    assert out.token_ids == greedy(tiny, prompt, 20)
    assert not steps.compiled and steps.compiles == 0


def test_compile_setting():
    assert resolve_compile("auto", torch.device("cpu")) is False  # does not pay yet (steps.py)
    assert resolve_compile("auto", torch.device("cuda")) is False
    assert resolve_compile("off", torch.device("cpu")) is False
    assert resolve_compile("on", torch.device("cuda")) is True
