"""Plain greedy decoding with transformers `generate`: the `ar` reference every speedup is measured against."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from dare.model import LoadedModel


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
def greedy_generate(lm: LoadedModel, input_ids: list[int], max_new_tokens: int) -> Generation:
    start = time.perf_counter()
    x = torch.tensor([input_ids], device=lm.device)
    out = lm.model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=lm.tokenizer.pad_token_id,  # type: ignore[attr-defined]
    )
    new = out[0, len(input_ids) :].tolist()
    eos = lm.model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    for n, token in enumerate(new):  # drop EOS and anything after it
        if token in eos_ids:
            new = new[:n]
            break
    wall = time.perf_counter() - start
    text = lm.tokenizer.decode(new, skip_special_tokens=True)  # type: ignore[attr-defined]
    return Generation(new, text, steps=len(new), wall_s=wall)
