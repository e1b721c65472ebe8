"""Knowledge texts into pools, tokenized as the model will see them in an answer."""

from __future__ import annotations

from collections.abc import Sequence

from workers.engine.algorithm.draft import DraftConfig
from workers.engine.algorithm.trie import Pool


class PoolTexts:
    """Knowledge texts into pools (for any engine that drafts with this tokenizer): each text is indexed
    after the chat template's assistant header, so that an answer's opening words are drafted from its
    very first step."""

    def __init__(self, tokenizer: object, draft: DraftConfig) -> None:
        self.tokenizer = tokenizer
        self.depth = draft.max_key + draft.max_depth
        _, self.assistant_prefix = template_parts(tokenizer)

    def pool(self, texts: Sequence[str], max_nodes: int = 400_000, label: str = "pool") -> Pool:
        pool = Pool(depth=self.depth, max_nodes=max_nodes, label=label)
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
