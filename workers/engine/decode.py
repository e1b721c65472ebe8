"""DARE decoding: draft from pools, verify the tree in one forward, accept, repeat.

    prefill(prompt[:-1]); pending = prompt[-1]
    loop: tree = drafter.get_candidates(context)      # retrieval
          n = allocate(tree.scores, cost curve)       # cost model x expected acceptance
          logits = forward([pending, *tree[:n]])      # verify
          path, bonus = accept(logits, tree, rule)    # strict or relaxed
          keep the path's keys/values; emit path tokens + bonus; pending = bonus

One request alone is a batch of one: `Dare.generate` runs the same `BatchDecoder` (batch.py) that the
workers run at any batch size, so there is one cache design and one forward to make fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.engine.accept import Acceptance
from workers.engine.batch import BatchDecoder, RequestStats
from workers.engine.budget import Budget, CostModel
from workers.engine.draft import DraftConfig, Drafter, NoDrafter, RetrievalDrafter
from workers.engine.pool import Pool
from workers.engine.steps import StepForward


@dataclass
class Output:
    token_ids: list[int]
    text: str
    stats: RequestStats


class Dare:
    """One model with its cost curve and decoding settings; `generate` decodes one request
    against the pools it is given (segment, global, ...) plus its own prompt and output."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, cost: CostModel, draft: DraftConfig | None = None,
                 top_k: int = 2, min_prob: float = 0.1, self_weight: float = 1.0, eos_token_ids: set[int] | None = None,
                 steps: StepForward | None = None) -> None:
        self.model = model
        self.steps = steps or StepForward(model)  # shared by every decoder made here: compiled graphs are reused
        self.tokenizer = tokenizer
        self.cost = cost
        self.draft = draft or DraftConfig()
        self.top_k, self.min_prob, self.self_weight = top_k, min_prob, self_weight
        if eos_token_ids is None:
            eos = model.generation_config.eos_token_id  # type: ignore[union-attr]
            eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.eos_token_ids = eos_token_ids
        self.prompt_prefix, _ = template_parts(tokenizer)  # every chat prompt starts with prompt_prefix
        self.texts = PoolTexts(tokenizer, self.draft)
        self._single: BatchDecoder | None = None

    def pool(self, texts: Sequence[str], max_nodes: int = 400_000) -> Pool:
        return self.texts.pool(texts, max_nodes)

    def add_text(self, pool: Pool, text_id: str, text: str) -> None:
        self.texts.add_text(pool, text_id, text)

    def request(self, input_ids: Sequence[int], pools: Sequence[tuple[Pool, float]], mode: str, use_self: bool = True
                ) -> tuple[Drafter, Budget, Acceptance]:
        """What one request decodes with (alone or in a batch): its drafter, budget and acceptance rule.
        `mode` is the wire's (schemas.Mode): `ar` is greedy decoding through this same loop, with no
        drafts; `strict` and `relaxed` draft from `pools` (and the request's own text) and accept by
        that rule."""
        budget = Budget(self.cost, max_tokens=self.draft.max_nodes)
        if mode == "ar":
            return NoDrafter(), budget, Acceptance("strict")
        drafter = RetrievalDrafter(pools, self.draft, prompt=input_ids if use_self else None, self_weight=self.self_weight)
        return drafter, budget, Acceptance(mode, self.top_k, self.min_prob)

    def decoder(self, rows: int = 1) -> BatchDecoder:
        """A batch decoder over this model with room for `rows` requests at once."""
        return BatchDecoder(self.model, self.eos_token_ids, rows=rows, prefix=self.prompt_prefix, steps=self.steps)

    def generate(self, input_ids: Sequence[int], pools: Sequence[tuple[Pool, float]], mode: str, max_new_tokens: int,
                 use_self: bool = True) -> Output:
        """Decode one request alone (a batch of one; its cache and the prompt head's keys are kept for the next)."""
        if self._single is None:
            self._single = self.decoder(rows=1)
        self._single.add(None, input_ids, *self.request(input_ids, pools, mode, use_self), max_new_tokens)
        finished = []
        while not finished:
            finished = self._single.step()
        out = finished[0]
        return Output(out.token_ids, self.tokenizer.decode(out.token_ids, skip_special_tokens=True), out.stats)  # type: ignore[attr-defined]


class PoolTexts:
    """Knowledge texts into pools (for any engine that drafts with this tokenizer): each text is indexed
    after the chat template's assistant header, so that an answer's opening words are drafted from its
    very first step."""

    def __init__(self, tokenizer: object, draft: DraftConfig) -> None:
        self.tokenizer = tokenizer
        self.depth = draft.max_key + draft.max_depth
        _, self.assistant_prefix = template_parts(tokenizer)

    def pool(self, texts: Sequence[str], max_nodes: int = 400_000) -> Pool:
        pool = Pool(depth=self.depth, max_nodes=max_nodes)
        for n, text in enumerate(texts):
            self.add_text(pool, str(n), text)
        return pool

    def add_text(self, pool: Pool, text_id: str, text: str) -> None:
        pool.add(text_id, self.assistant_prefix + self.tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]


def template_parts(tokenizer: object) -> tuple[list[int], list[int]]:
    """The chat template's tokens before a user message and between it and the assistant's answer
    (both empty without a template)."""
    try:
        a = tokenizer.apply_chat_template([{"role": "user", "content": "a"}], add_generation_prompt=True, tokenize=True, return_dict=False)  # type: ignore[attr-defined]
        b = tokenizer.apply_chat_template([{"role": "user", "content": "b"}], add_generation_prompt=True, tokenize=True, return_dict=False)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 (tokenizers without a chat template raise various errors)
        return [], []  # no chat template: pools hold bare texts
    a, b = list(a), list(b)
    head = tail = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    return a[:head], a[len(a) - tail :]
