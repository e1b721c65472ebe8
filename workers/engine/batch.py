"""Batched DARE: several requests verified in one forward pass, joining and leaving at any step.

One KV cache holds every row, padded to a common length. Each row owns a boolean map of the
cache slots that hold its tokens (`valid`); the 4D mask shows a row its own valid slots plus its
tree's ancestors, and position ids count only its own tokens, so padding and holes change nothing
a row computes (up to floating-point summation order). Per step:

    each row drafts its tree from its own pools; the batch's draft tokens go to the rows whose
    nodes are most likely accepted, as many as the device's cost curve says pay (`allocate`)
    one forward over [pending, *tree] per row, right-padded to the longest
    each row accepts its path (strict or relaxed); the accepted keys/values are gathered to
    the front of the new slots, the rest become holes; columns no row uses are dropped

A row that joins is prefilled on its own and merged in (its slots padded); a finished row leaves.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from workers.engine.accept import Acceptance, accept
from workers.engine.budget import Budget, allocate
from workers.engine.decode import DecodeStats
from workers.engine.draft import RetrievalDrafter
from workers.engine.verify import ancestor_matrix, forward, new_cache


@dataclass
class Row:
    key: Hashable
    context: list[int]
    pending: int
    length: int  # tokens of this row in the cache (the pending token's position)
    drafter: RetrievalDrafter
    budget: Budget
    rule: Acceptance
    max_new_tokens: int
    out: list[int] = field(default_factory=list)
    stats: DecodeStats = field(default_factory=DecodeStats)
    started: float = field(default_factory=time.perf_counter)
    done: bool = False


@dataclass
class Finished:
    key: Hashable
    token_ids: list[int]
    stats: DecodeStats


class BatchDecoder:
    def __init__(self, model: torch.nn.Module, eos_token_ids: set[int]) -> None:
        self.model = model
        self.eos = eos_token_ids
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.valid = torch.zeros((0, 0), dtype=torch.bool)  # rows x cache slots

    def __len__(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ joining and leaving

    @torch.inference_mode()
    def add(self, key: Hashable, input_ids: Sequence[int], drafter: RetrievalDrafter, budget: Budget, rule: Acceptance,
            max_new_tokens: int) -> None:
        """Prefill a request on its own and merge it into the batch."""
        if len(input_ids) < 2:
            raise ValueError("batched decoding needs a prompt of at least 2 tokens (one is cached at join)")
        row = Row(key, list(input_ids), input_ids[-1], len(input_ids) - 1, drafter, budget, rule, max_new_tokens)
        cache = new_cache(self.model)
        forward(self.model, cache, torch.tensor([list(input_ids[:-1])], device=self.device),
                torch.arange(row.length, device=self.device)[None])
        row.stats.prefill_s = time.perf_counter() - row.started
        valid = torch.ones((1, row.length), dtype=torch.bool)
        if self.cache is None or not self.rows:
            self.cache, self.valid = cache, valid
        else:
            self._merge(cache, valid)
        self.rows.append(row)

    def _merge(self, cache: DynamicCache, valid: torch.Tensor) -> None:
        assert self.cache is not None
        width = max(self.valid.shape[1], valid.shape[1])
        self.valid = torch.cat([_pad_cols(self.valid, width), _pad_cols(valid, width)])
        for mine, new in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_seq(mine.keys, width), _pad_seq(new.keys, width)])
            mine.values = torch.cat([_pad_seq(mine.values, width), _pad_seq(new.values, width)])

    def _keep_rows(self, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.valid = self.valid[index]
        if self.cache is not None:
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))
                layer.values = layer.values.index_select(0, index.to(layer.values.device))
        self._drop_unused_columns()

    def _drop_unused_columns(self) -> None:
        used = self.valid.any(0)
        if bool(used.all()) or self.cache is None:
            return
        cols = used.nonzero()[:, 0]
        self.valid = self.valid[:, cols]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(2, cols.to(layer.keys.device))
            layer.values = layer.values.index_select(2, cols.to(layer.values.device))

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """Verify one draft tree per row in one forward; returns the rows that finished."""
        if not self.rows:
            return []
        assert self.cache is not None
        t0 = time.perf_counter()
        candidates = [row.drafter.get_candidates(row.context) for row in self.rows]
        sizes = allocate([c.scores[: r.budget.max_tokens] for c, r in zip(candidates, self.rows)],
                         [r.budget.calibration for r in self.rows], self.rows[0].budget.cost)
        trees = [c.prefix(n) for c, n in zip(candidates, sizes)]
        t1 = time.perf_counter()
        ids, positions, mask = self._inputs(trees)
        past = self.valid.shape[1]
        logits = forward(self.model, self.cache, ids, positions, mask)
        t2 = time.perf_counter()
        kept = []
        for b, (row, tree) in enumerate(zip(self.rows, trees)):
            path, bonus = accept(logits[b, : len(tree) + 1], tree, row.rule)
            kept.append([0, *path])
            row.budget.observe(sum(tree.scores), len(path))
            self._emit(row, [tree.tokens[p - 1] for p in path] + [bonus], len(tree))
            row.pending = bonus
        self._keep_paths(past, kept)
        t3 = time.perf_counter()
        for row in self.rows:  # the shared forward's time is every row's time
            row.stats.retrieval_s += (t1 - t0) / len(self.rows)
            row.stats.forward_s += t2 - t1
            row.stats.bookkeeping_s += (t3 - t2) / len(self.rows)
        finished = []
        for row in self.rows:
            if row.done:
                row.stats.new_tokens, row.stats.wall_s = len(row.out), time.perf_counter() - row.started
                finished.append(Finished(row.key, row.out, row.stats))
        if finished:
            self._keep_rows([i for i, r in enumerate(self.rows) if not r.done])
        return finished

    def _inputs(self, trees: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[type-arg]
        batch, past = len(self.rows), self.valid.shape[1]
        width = max(len(t) for t in trees) + 1
        ids = torch.zeros((batch, width), dtype=torch.long)
        positions = torch.zeros((batch, width), dtype=torch.long)
        visible = torch.zeros((batch, width, past + width), dtype=torch.bool)
        for b, (row, tree) in enumerate(zip(self.rows, trees)):
            n = len(tree) + 1
            ids[b, :n] = torch.tensor([row.pending, *tree.tokens])
            positions[b, :n] = torch.tensor([row.length, *(row.length + d for d in tree.depths)])
            positions[b, n:] = row.length
            visible[b, :n, :past] = self.valid[b]
            visible[b, :n, past : past + n] = ancestor_matrix(tree.parents)
            visible[b, n:, past + n :] = torch.eye(width - n, dtype=torch.bool)  # padding sees itself only
        mask = torch.zeros((batch, 1, width, past + width), dtype=self.dtype)
        mask.masked_fill_(~visible[:, None], torch.finfo(self.dtype).min)
        return ids.to(self.device), positions.to(self.device), mask.to(self.device)

    def _emit(self, row: Row, new: list[int], drafted: int) -> None:
        row.stats.steps += 1
        row.stats.drafted.append(drafted)
        row.stats.accepted.append(len(new))
        for i, token in enumerate(new):
            if token in self.eos:
                new, row.done = new[:i], True
                break
        if len(row.out) + len(new) >= row.max_new_tokens:
            new, row.done = new[: row.max_new_tokens - len(row.out)], True
        row.out.extend(new)
        row.context.extend(new)
        row.drafter.update(new)

    def _keep_paths(self, past: int, kept: list[list[int]]) -> None:
        """Each row's accepted tree positions move to the front of the new slots; the rest are holes."""
        assert self.cache is not None
        width = max(len(k) for k in kept)
        index = torch.full((len(kept), width), past, dtype=torch.long)
        valid = torch.zeros((len(kept), width), dtype=torch.bool)
        for b, path in enumerate(kept):
            index[b, : len(path)] = torch.tensor([past + p for p in path])
            valid[b, : len(path)] = True
            self.rows[b].length += len(path)
        for layer in self.cache.layers:
            gather = index.to(layer.keys.device)[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = torch.cat([layer.keys[:, :, :past], layer.keys.gather(2, gather)], dim=2)
            layer.values = torch.cat([layer.values[:, :, :past], layer.values.gather(2, gather)], dim=2)
        self.valid = torch.cat([self.valid, valid], dim=1)


def _pad_cols(valid: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([valid, torch.zeros((valid.shape[0], width - valid.shape[1]), dtype=torch.bool)], dim=1)


def _pad_seq(t: torch.Tensor, width: int) -> torch.Tensor:
    if t.shape[2] == width:
        return t
    return torch.cat([t, t.new_zeros(t.shape[0], t.shape[1], width - t.shape[2], t.shape[3])], dim=2)
