"""Acceptance: walk the verified tree from the root, keeping the draft tokens the model agrees with.

strict:  a child is accepted when it is the model's argmax (lossless: output equals greedy).
relaxed: a child is accepted when it is among the model's top-k tokens with probability > p
         (LASER's relaxed verification; defaults k=2, p=0.1), or when it is the argmax (which
         would be emitted as the bonus token anyway, so rejecting it would only cost a step).
         Of several such children the most probable is taken. Guard (`max_top1` < 1): where the
         model's own top-1 probability is above it, only the argmax is accepted, so a pool text's
         wording replaces the model's only where the model itself is unsure.
Either way the token after the accepted path is the model's argmax there (the bonus token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.engine.algorithm.draft import DraftTree


@dataclass(frozen=True)
class Acceptance:
    mode: str = "strict"  # "strict" or "relaxed"
    top_k: int = 2
    min_prob: float = 0.1
    max_top1: float = 1.0  # relaxed: other tokens only where the argmax's probability is at most this (1.0: everywhere)


def children_of(tree: DraftTree) -> list[list[int]]:
    """children[p] lists the tree positions whose parent is position p (0 is the root)."""
    children: list[list[int]] = [[] for _ in range(len(tree) + 1)]
    for i, parent in enumerate(tree.parents, start=1):
        children[parent + 1].append(i)
    return children


def accept(logits: torch.Tensor, tree: DraftTree, rule: Acceptance) -> tuple[list[int], int]:
    """From logits (n+1, vocab) over [pending, *tree]: the accepted tree positions (>= 1, root
    to leaf) and the bonus token."""
    argmax = logits.argmax(-1).tolist()
    children = children_of(tree)
    path: list[int] = []
    position = 0
    if rule.mode == "strict":
        while True:
            want = argmax[position]
            nxt = next((c for c in children[position] if tree.tokens[c - 1] == want), None)
            if nxt is None:
                break
            path.append(nxt)
            position = nxt
        return path, argmax[position]

    probs = None
    top_tokens: list[list[int]] = []
    while children[position]:
        if probs is None:  # softmax only when some node has children: once per step
            probs = torch.softmax(logits.float(), dim=-1)
            top_tokens = probs.topk(rule.top_k, dim=-1).indices.tolist()
        allowed = set(top_tokens[position])
        row = probs[position]
        sure = float(row[argmax[position]]) > rule.max_top1  # the model is sure here: its own token only
        best, best_p = None, rule.min_prob
        for c in children[position]:
            token = tree.tokens[c - 1]
            if token == argmax[position]:
                best = c
                break
            if token in allowed and not sure:
                p = float(row[token])
                if p > best_p:
                    best, best_p = c, p
        if best is None:
            break
        path.append(best)
        position = best
    return path, argmax[position]
