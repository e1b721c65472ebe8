"""What each decoding mode does, in one place for every backend.

    ar       no drafts; exact acceptance: the model's greedy decoding
    strict   drafts from the pools and the request's own text; exact acceptance (greedy's tokens, fewer steps)
    relaxed  the same drafts; a draft token is accepted when it is among the model's top_k with
             probability > min_prob, and (guard) only where the model's top-1 probability is at most
             max_top1 (accept.py)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from workers.engine.algorithm.accept import Acceptance
from workers.engine.algorithm.draft import DraftConfig, Drafter, NoDrafter, RetrievalDrafter, Source

MODES = ("ar", "strict", "relaxed")


PREFILL_PER_STEP = 256  # one chunk of the lean forward's prefill (`LeanForward.prefill_chunk`)


@dataclass(frozen=True)
class Strategy:
    """The decoding settings a backend runs every mode with."""

    draft: DraftConfig = field(default_factory=DraftConfig)
    top_k: int = 2  # relaxed: a draft token among the model's top_k ...
    min_prob: float = 0.1  # ... with at least this probability is accepted ...
    max_top1: float = 1.0  # ... where the model's own top-1 probability is at most this (1.0: no guard)
    self_weight: float = 1.0  # weight of the request's own prompt and output as a draft source
    prefill_per_step: int = PREFILL_PER_STEP  # prompt tokens prefilled between two steps while rows decode (0: whole)

    def check(self, mode: str) -> str:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        return mode

    def drafter(self, mode: str, sources: Sequence[Source], prompt: Sequence[int] | None) -> Drafter:
        """`ar`: none; else a retrieval drafter over `sources` (pools with weights) and, unless None, the
        request's own `prompt` (its output joins as it decodes)."""
        if self.check(mode) == "ar":
            return NoDrafter()
        return RetrievalDrafter(sources, self.draft, prompt=prompt, self_weight=self.self_weight)

    def rule(self, mode: str) -> Acceptance:
        if self.check(mode) == "relaxed":
            return Acceptance("relaxed", self.top_k, self.min_prob, self.max_top1)
        return Acceptance("strict")
