"""Stock transformers `generate`, greedy: the external reference. `hf-generate` in the benches (what
users would run without this project), and the oracle the exactness tests compare strict decoding
with. The engine's own greedy decoding is mode `ar` (`TransformersEngine`), not this. It runs on the
weights as loaded, also where the engine's steps use packed fp16 ones (weights.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from workers.engine import LoadedModel


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    steps: int  # forward passes after the prefill
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.wall_s if self.wall_s > 0 else 0.0


@torch.inference_mode()
def hf_generate(lm: LoadedModel, input_ids: list[int], max_new_tokens: int, **generate_kwargs: object) -> Generation:
    """Greedy decoding of one prompt; `generate_kwargs` pass through (e.g. prompt_lookup_num_tokens)."""
    start = time.perf_counter()
    x = torch.tensor([input_ids], device=lm.device)
    out = lm.model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=lm.tokenizer.pad_token_id,  # type: ignore[attr-defined]
        **generate_kwargs,
    )
    new = until_eos(lm, out[0, len(input_ids) :].tolist())
    wall = time.perf_counter() - start
    text = lm.tokenizer.decode(new, skip_special_tokens=True)  # type: ignore[attr-defined]
    return Generation(new, text, steps=len(new), wall_s=wall)


@torch.inference_mode()
def hf_generate_batch(lm: LoadedModel, inputs: list[list[int]], max_new_tokens: int) -> list[Generation]:
    """Greedy decoding of several prompts in one left-padded batch (transformers `generate`).
    `wall_s` of each result is the batch's wall time."""
    start = time.perf_counter()
    pad = lm.tokenizer.pad_token_id  # type: ignore[attr-defined]
    width = max(len(ids) for ids in inputs)
    x = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in inputs], device=lm.device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in inputs], device=lm.device)
    out = lm.model.generate(x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    wall = time.perf_counter() - start
    results = []
    for row in out[:, width:].tolist():
        new = until_eos(lm, row)
        results.append(Generation(new, lm.tokenizer.decode(new, skip_special_tokens=True), len(new), wall))  # type: ignore[attr-defined]
    return results


def until_eos(lm: LoadedModel, tokens: list[int]) -> list[int]:
    eos = lm.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    for n, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:n]
    return tokens
