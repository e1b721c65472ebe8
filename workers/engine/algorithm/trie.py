"""Retrieval pools: token-level indexes of knowledge text with continuation counts.

Why a trie of bounded-depth n-grams (as in Lookahead/LASER) and not a suffix array (REST) or a
suffix automaton: pools here are small (per segment), grow one text at a time while the
system runs, and lose their oldest texts under a cap. A trie takes an insert or a removal in
O(len(text) * depth) with no rebuild, and a lookup for a context suffix of length k is k dict
steps, after which the node's subtree *is* the continuation distribution with its counts:
the draft tree is read off directly. A suffix array would need re-sorting on insert; a suffix
automaton does not support removal.

Every path of length <= `depth` that occurs in a text is a node; its count is how often it
occurs. So count(path + t) / count(path) estimates P(t | path).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

# A node is [count, children] with children: dict[token, node]. Plain lists keep it small and fast.
Node = list


def _new_node() -> Node:
    return [0, {}]


class Pool:
    """A bounded trie over token sequences. Oldest texts are evicted first when `max_nodes` is exceeded.
    `label` names it as a draft source (`segment`, `global`, `own`...), which its draft nodes carry."""

    def __init__(self, depth: int = 16, max_nodes: int = 400_000, label: str = "pool") -> None:
        if depth < 2:
            raise ValueError("depth must be at least 2 (a key token and one continuation)")
        self.depth = depth
        self.max_nodes = max_nodes
        self.label = label
        self.root: Node = _new_node()
        self.nodes = 0
        self.texts: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.texts)

    def __contains__(self, text_id: str) -> bool:
        return text_id in self.texts

    def add(self, text_id: str, tokens: Sequence[int]) -> None:
        """Index a text (replacing an earlier text of the same id), then evict to the cap."""
        if text_id in self.texts:
            self.remove(text_id)
        tokens = tuple(tokens)
        self.texts[text_id] = tokens
        self._update(tokens, +1)
        while self.nodes > self.max_nodes and len(self.texts) > 1:
            oldest = next(iter(self.texts))
            self.remove(oldest)
            self.evicted += 1

    def remove(self, text_id: str) -> None:
        tokens = self.texts.pop(text_id, None)
        if tokens is not None:
            self._update(tokens, -1)

    def _update(self, tokens: tuple[int, ...], delta: int) -> None:
        depth, n = self.depth, len(tokens)
        for start in range(n):
            node = self.root
            for token in tokens[start : min(n, start + depth)]:
                children = node[1]
                child = children.get(token)
                if child is None:
                    child = children[token] = _new_node()
                    self.nodes += 1
                child[0] += delta
                if child[0] <= 0:
                    self._prune(children, token, child)
                    break
                node = child

    def _prune(self, children: dict, token: int, child: Node) -> None:
        del children[token]
        stack = [child]
        while stack:  # count the whole removed subtree
            node = stack.pop()
            self.nodes -= 1
            stack.extend(node[1].values())

    def lookup(self, context: Sequence[int], max_key: int) -> list[tuple[int, Node]]:
        """Nodes matching the context's suffixes of length 1..max_key that have continuations."""
        found = []
        for k in range(1, min(max_key, len(context), self.depth - 1) + 1):
            node = self.root
            for token in context[len(context) - k :]:
                node = node[1].get(token)
                if node is None:
                    break
            if node is None:
                break  # no longer suffix can match either
            if node[1]:
                found.append((k, node))
        return found


class LiveText(Pool):
    """The request's own prompt and output as a drafting source (prompt lookup), extended as
    tokens are generated. It indexes all but the last token, so that a lookup of the
    context's suffix finds only *earlier* occurrences, each with its real continuation."""

    def __init__(self, depth: int = 16) -> None:
        super().__init__(depth=depth, max_nodes=1 << 62, label="own")
        self.tokens: list[int] = []
        self._open: list[Node] = []  # nodes of the suffixes ending at the last indexed token

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            if len(self.tokens) >= 2:
                self._index(self.tokens[-2])

    def _index(self, token: int) -> None:
        grown = []
        for node in [self.root, *self._open]:
            child = node[1].get(token)
            if child is None:
                child = node[1][token] = _new_node()
                self.nodes += 1
            child[0] += 1
            grown.append(child)
        self._open = grown[: self.depth - 1]
