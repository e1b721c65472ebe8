"""Drafting: turn pool matches into a token tree, most probable continuations first.

Each source (segment pool, global pool, the request's own text) is matched at every suffix
length 1..max_key; a match of length k votes for a continuation path with weight k^power
times the path's estimated probability count(match+path) / (count(match) + smoothing).
A best-first search pops paths in order of their merged score. Since a child never scores
above its parent, every prefix of the pop order is a tree (ancestors come first), and its
scores estimate how likely each node is to be accepted: the budget cuts the prefix it wants.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from workers.engine.algorithm.trie import LiveText, Node, Pool


@dataclass
class DraftTree:
    """Draft nodes in pop order. parents[i] is the index of node i's parent, -1 for the
    pending token (the tree's root, the last token not yet in the cache)."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)  # 1 for children of the root
    scores: list[float] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # the label of the pool that gave each node most of its score

    def __len__(self) -> int:
        return len(self.tokens)

    def prefix(self, n: int) -> DraftTree:
        return DraftTree(self.tokens[:n], self.parents[:n], self.depths[:n], self.scores[:n], self.sources[:n])


@dataclass
class DraftConfig:
    max_nodes: int = 64
    max_depth: int = 12
    max_key: int = 8
    max_children: int = 8  # branches considered per node
    length_power: float = 1.0  # weight of a match of length k is k**length_power
    smoothing: float = 0.5  # added to the match count: a path seen once is not a certainty


Source = tuple[Pool, float]  # a pool and its weight


def build_draft(context: Sequence[int], sources: Sequence[Source], config: DraftConfig) -> DraftTree:
    """The best-first draft tree for what follows `context`, merged over all sources; each node names the source
    whose votes gave it most of its score."""
    # Every (node, scale, source) triple is one vote: scale = w / (count + smoothing); a path's score is the
    # w-weighted mean over votes of its estimated probability, so it lies in [0, 1].
    votes: list[tuple[Node, float, str]] = []
    total_weight = 0.0
    for pool, weight in sources:
        for k, node in pool.lookup(context, config.max_key):
            w = weight * k**config.length_power
            votes.append((node, w / (node[0] + config.smoothing), pool.label))
            total_weight += w
    tree = DraftTree()
    if not votes:
        return tree
    norm = 1.0 / total_weight

    heap: list[tuple] = []
    counter = 0

    def push_children(parent_votes: list[tuple[Node, float, str]], parent: int, depth: int) -> None:
        nonlocal counter
        merged: dict[int, tuple[float, list[tuple[Node, float, str]], dict[str, float]]] = {}
        for node, scale, label in parent_votes:
            children = node[1]
            items = children.items() if len(children) <= config.max_children else heapq.nlargest(
                config.max_children, children.items(), key=lambda kv: kv[1][0]
            )
            for token, child in items:
                score, child_votes, by_source = merged.get(token, (0.0, [], {}))
                child_votes.append((child, scale, label))
                share = scale * child[0] * norm
                by_source[label] = by_source.get(label, 0.0) + share
                merged[token] = (score + share, child_votes, by_source)
        for token, (score, child_votes, by_source) in merged.items():
            counter += 1
            heapq.heappush(heap, (-score, counter, token, parent, depth, child_votes, max(by_source, key=by_source.__getitem__)))

    push_children(votes, -1, 1)
    while heap and len(tree) < config.max_nodes:
        neg_score, _, token, parent, depth, child_votes, source = heapq.heappop(heap)
        index = len(tree)
        tree.tokens.append(token)
        tree.parents.append(parent)
        tree.depths.append(depth)
        tree.scores.append(min(1.0, -neg_score))
        tree.sources.append(source)
        if depth < config.max_depth:
            push_children(child_votes, index, depth + 1)
    return tree


class Drafter(Protocol):
    """What the decoding loops ask of a drafting strategy; they do not know which one they hold."""

    def get_candidates(self, context: Sequence[int]) -> DraftTree:
        """The draft tree for what follows `context`, best nodes first."""
        ...

    def update(self, new_tokens: Sequence[int]) -> None:
        """The tokens the request just emitted."""
        ...


class NoDrafter:
    """Drafts nothing: every step verifies only the pending token (greedy decoding, mode `ar`)."""

    def get_candidates(self, context: Sequence[int]) -> DraftTree:
        return DraftTree()

    def update(self, new_tokens: Sequence[int]) -> None:
        pass


class RetrievalDrafter:
    """Drafts from pools plus (optionally) the request's own prompt and output."""

    def __init__(self, pools: Sequence[Source], config: DraftConfig, prompt: Sequence[int] | None = None,
                 self_weight: float = 1.0) -> None:
        self.config = config
        self.live = LiveText(depth=config.max_key + config.max_depth) if prompt is not None else None
        self.sources: list[Source] = list(pools)
        if self.live is not None:
            self.live.extend(prompt)  # type: ignore[arg-type]
            self.sources.append((self.live, self_weight))

    def get_candidates(self, context: Sequence[int]) -> DraftTree:
        return build_draft(context, self.sources, self.config)

    def update(self, new_tokens: Sequence[int]) -> None:
        if self.live is not None:
            self.live.extend(new_tokens)
