"""How alike and how finished generated knowledge texts are: the signs of a decoder that copies pool
templates into every text (`dare eval quality`, issue 25).

Texts are compared as lowercase words (letters, digits and apostrophes; punctuation dropped). Per set of
texts (one mode, one entity kind):

- `distinct_2`: distinct word bigrams / all word bigrams over the set (higher: more varied).
- `shared_first_sentence`: share of texts whose first sentence, as words, is also another text's first sentence.
- `repeated_6gram`: mean over texts of the share of a text's word 6-grams that repeat one earlier in the same
  text (a text looping on a phrase).
- `copied_span_mean` / `copied_span_p95`: the longest run of words a text shares verbatim with any other text
  of the set (the pools are made of the other entities' texts), in words.
- `truncated`: share of texts that stopped at the token cap instead of the model's end of text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

WORD = re.compile(r"[a-z0-9']+")
SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def first_sentence(text: str) -> tuple[str, ...]:
    end = SENTENCE_END.search(text)
    return tuple(words(text[: end.start()] if end else text))


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_2(texts: Sequence[list[str]]) -> float:
    bigrams = [g for t in texts for g in ngrams(t, 2)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def shared_first_sentence(texts: Sequence[str]) -> float:
    firsts = [first_sentence(t) for t in texts]
    counts = Counter(f for f in firsts if f)
    return sum(1 for f in firsts if f and counts[f] > 1) / len(texts) if texts else 0.0


def repeated_6gram(texts: Sequence[list[str]]) -> float:
    shares = []
    for t in texts:
        grams = ngrams(t, 6)
        if grams:
            shares.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(shares)) if shares else 0.0


def longest_copied_spans(texts: Sequence[list[str]]) -> list[int]:
    """For each text, the most consecutive words it shares with some other text of the set. A shared
    n-gram's every (n-1)-gram is shared too, so each text's span is found by binary search over n, with
    one index of n-grams → owners per n asked for."""
    owners: dict[int, dict[tuple[str, ...], int]] = {}

    def shared(i: int, n: int) -> bool:
        if n not in owners:  # an n-gram seen in two texts or more maps to -1
            index: dict[tuple[str, ...], int] = {}
            for j, t in enumerate(texts):
                for g in set(ngrams(t, n)):
                    index[g] = j if index.get(g, j) == j else -1
            owners[n] = index
        return any(owners[n].get(g) == -1 for g in ngrams(texts[i], n))

    spans = []
    for i, t in enumerate(texts):
        low, high = 0, len(t)  # shared(i, low) holds (0 trivially); find the largest such n
        while low < high:
            mid = (low + high + 1) // 2
            if shared(i, mid):
                low = mid
            else:
                high = mid - 1
        spans.append(low)
    return spans


def text_metrics(texts: Sequence[str], token_counts: Sequence[int], cap: int | None) -> dict[str, float | int | None]:
    """Every metric over one set of texts (see the module's docstring); `cap`: the run's token limit (None:
    unknown, so `truncated` is None)."""
    tokens = [words(t) for t in texts]
    spans = longest_copied_spans(tokens)
    return {
        "texts": len(texts),
        "distinct_2": distinct_2(tokens),
        "shared_first_sentence": shared_first_sentence(texts),
        "repeated_6gram": repeated_6gram(tokens),
        "copied_span_mean": float(np.mean(spans)) if spans else 0.0,
        "copied_span_p95": float(np.percentile(spans, 95)) if spans else 0.0,
        "truncated": (sum(c >= cap for c in token_counts) / len(texts) if texts else 0.0) if cap else None,
    }
