"""DARE decoding: draft from pools, verify the tree in one forward, accept, repeat.

    prefill(prompt[:-1]); pending = prompt[-1]
    loop: tree = drafter.get_candidates(context)      # retrieval
          n = budget.choose(tree.scores)              # cost model x expected acceptance
          logits = forward([pending, *tree[:n]])      # verify
          path, bonus = accept(logits, tree, rule)    # strict or relaxed
          keep the path's keys/values; emit path tokens + bonus; pending = bonus
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from workers.engine.accept import Acceptance, accept
from workers.engine.budget import Budget, CostModel
from workers.engine.draft import DraftConfig, Drafter, NoDrafter, RetrievalDrafter
from workers.engine.pool import Pool
from workers.engine.verify import cache_length, forward, keep_accepted, new_cache, tree_inputs


@dataclass
class RequestStats:
    """One request's decoding, step by step (the wire's `DecodeStats` is its summary)."""

    steps: int = 0
    new_tokens: int = 0
    accepted: list[int] = field(default_factory=list)  # tokens emitted per step (accepted drafts + 1)
    drafted: list[int] = field(default_factory=list)  # draft tokens sent per step
    prefill_s: float = 0.0
    retrieval_s: float = 0.0
    forward_s: float = 0.0
    bookkeeping_s: float = 0.0
    wall_s: float = 0.0

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted) / len(self.accepted) if self.accepted else 0.0


@dataclass
class Finished:
    """A request the decoder is done with, under the key it was added with."""

    key: Hashable
    token_ids: list[int]
    stats: RequestStats


@dataclass
class Output:
    token_ids: list[int]
    text: str
    stats: RequestStats


def stop_index(text: str, stop_strings: Sequence[str]) -> int | None:
    hits = [i for s in stop_strings if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


@torch.inference_mode()
def speculative_generate(
    model: torch.nn.Module,
    tokenizer: object,
    input_ids: Sequence[int],
    drafter: Drafter,
    budget: Budget,
    rule: Acceptance,
    max_new_tokens: int,
    eos_token_ids: set[int],
    stop_strings: Sequence[str] = (),
) -> Output:
    if not input_ids:
        raise ValueError("empty prompt: nothing to continue")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    stats = RequestStats()
    start = time.perf_counter()
    cache = new_cache(model)
    if len(input_ids) > 1:
        forward(model, cache, torch.tensor([list(input_ids[:-1])], device=device),
                torch.arange(len(input_ids) - 1, device=device)[None])
    stats.prefill_s = time.perf_counter() - start
    context = list(input_ids)
    pending = context[-1]
    out: list[int] = []
    done = False
    while not done:
        t0 = time.perf_counter()
        candidates = drafter.get_candidates(context)
        n = budget.choose(candidates.scores)
        tree = candidates.prefix(n)
        t1 = time.perf_counter()
        past = cache_length(cache)
        ids, positions, mask = tree_inputs(pending, tree, past, device, dtype)
        logits = forward(model, cache, ids, positions, mask)[0]
        t2 = time.perf_counter()
        path, bonus = accept(logits, tree, rule)
        keep_accepted(cache, past, [0, *path])
        new = [tree.tokens[p - 1] for p in path] + [bonus]
        budget.observe(sum(tree.scores), len(path))
        stats.steps += 1
        stats.drafted.append(n)
        stats.accepted.append(len(new))
        for i, token in enumerate(new):  # stop on EOS and the token limit
            if token in eos_token_ids:
                new, done = new[:i], True
                break
        if len(out) + len(new) >= max_new_tokens:
            new, done = new[: max_new_tokens - len(out)], True
        out.extend(new)
        context.extend(new)
        drafter.update(new)
        pending = bonus
        if stop_strings and not done:
            tail = tokenizer.decode(out[-64:])  # type: ignore[attr-defined]
            done = stop_index(tail, stop_strings) is not None
        t3 = time.perf_counter()
        stats.retrieval_s += t1 - t0
        stats.forward_s += t2 - t1
        stats.bookkeeping_s += t3 - t2
    text = tokenizer.decode(out, skip_special_tokens=True)  # type: ignore[attr-defined]
    if stop_strings and (cut := stop_index(text, stop_strings)) is not None:
        text = text[:cut]
        out = tokenizer.encode(text, add_special_tokens=False) if text else []  # type: ignore[attr-defined]
    stats.new_tokens = len(out)
    stats.wall_s = time.perf_counter() - start
    return Output(out, text, stats)


class Dare:
    """One model with its cost curve and decoding settings; `generate` decodes one request
    against the pools it is given (segment, global, ...) plus its own prompt and output."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, cost: CostModel, draft: DraftConfig | None = None,
                 top_k: int = 2, min_prob: float = 0.1, self_weight: float = 1.0, eos_token_ids: set[int] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cost = cost
        self.draft = draft or DraftConfig()
        self.top_k, self.min_prob, self.self_weight = top_k, min_prob, self_weight
        if eos_token_ids is None:
            eos = model.generation_config.eos_token_id  # type: ignore[union-attr]
            eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.eos_token_ids = eos_token_ids
        self.prompt_prefix, self.assistant_prefix = template_parts(tokenizer)  # every chat prompt starts with prompt_prefix

    def pool(self, texts: Sequence[str], max_nodes: int = 400_000) -> Pool:
        """A pool over generated texts, each preceded by the chat template's assistant header so that
        an answer's opening words are drafted from its very first step."""
        pool = Pool(depth=self.draft.max_key + self.draft.max_depth, max_nodes=max_nodes)
        for n, text in enumerate(texts):
            self.add_text(pool, str(n), text)
        return pool

    def add_text(self, pool: Pool, text_id: str, text: str) -> None:
        pool.add(text_id, self.assistant_prefix + self.tokenizer.encode(text, add_special_tokens=False))  # type: ignore[attr-defined]

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

    def generate(self, input_ids: Sequence[int], pools: Sequence[tuple[Pool, float]], mode: str, max_new_tokens: int,
                 use_self: bool = True, stop_strings: Sequence[str] = ()) -> Output:
        drafter, budget, rule = self.request(input_ids, pools, mode, use_self)
        return speculative_generate(self.model, self.tokenizer, input_ids, drafter, budget, rule, max_new_tokens,
                                    self.eos_token_ids, stop_strings)


class SequentialDecoder:
    """The batch decoder's interface (`add`, `step`, `len`) over `speculative_generate`: one request
    at a time, decoded whole by `step`. A service loop written for batches runs batch 1 with it."""

    def __init__(self, dare: Dare) -> None:
        self.dare = dare
        self.queued: list[tuple[Hashable, Sequence[int], Drafter, Budget, Acceptance, int]] = []

    def __len__(self) -> int:
        return len(self.queued)

    def add(self, key: Hashable, input_ids: Sequence[int], drafter: Drafter, budget: Budget, rule: Acceptance,
            max_new_tokens: int) -> None:
        self.queued.append((key, input_ids, drafter, budget, rule, max_new_tokens))

    def step(self) -> list[Finished]:
        if not self.queued:
            return []
        key, input_ids, drafter, budget, rule, max_new_tokens = self.queued.pop(0)
        out = speculative_generate(self.dare.model, self.dare.tokenizer, input_ids, drafter, budget, rule, max_new_tokens,
                                   self.dare.eos_token_ids)
        return [Finished(key, out.token_ids, out.stats)]


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
