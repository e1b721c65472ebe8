"""Batched DARE: several requests verified in one forward pass, joining and leaving at any step.

The rows share one preallocated KV cache (`SlotCache`): row r keeps its tokens in columns
[0, length_r), in order, with no holes. Per step:

    each row drafts its tree from its own pools; the batch's draft tokens go to the rows whose
    nodes are most likely accepted, as many as the device's cost curve says pay (`allocate`)
    one forward over [pending, *tree] per row, right-padded to the longest; row r's tokens are
    written at columns [length_r, length_r + width), and the 4D mask shows each token its own
    row's context and its tree ancestors; position ids count only the row's own tokens
    each row accepts its path (strict or relaxed); the accepted columns move to the front of
    the tree's columns and the row's length grows by them; the rest is overwritten next step

A row that joins is prefilled into a free row of the cache; a finished row leaves and the last
row moves into its place, so the batch's rows stay contiguous.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from workers.engine.accept import Acceptance, accept
from workers.engine.budget import Budget, allocate
from workers.engine.decode import DecodeStats
from workers.engine.draft import RetrievalDrafter
from workers.engine.slots import SlotCache
from workers.engine.verify import ancestor_matrix, forward


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
    def __init__(self, model: torch.nn.Module, eos_token_ids: set[int], rows: int = 1) -> None:
        """`rows`: how many rows to make room for at once (the batch size); more grow the cache."""
        self.model = model
        self.room = rows
        self.eos = eos_token_ids
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.rows: list[Row] = []
        self.cache = SlotCache(model)

    def __len__(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ joining and leaving

    @torch.inference_mode()
    def add(self, key: Hashable, input_ids: Sequence[int], drafter: RetrievalDrafter, budget: Budget, rule: Acceptance,
            max_new_tokens: int) -> None:
        """Prefill a request into the next free row of the cache."""
        if not input_ids:
            raise ValueError("empty prompt: nothing to continue")
        row = Row(key, list(input_ids), input_ids[-1], len(input_ids) - 1, drafter, budget, rule, max_new_tokens)
        b = len(self.rows)
        self.cache.reserve(max(b + 1, self.room), len(input_ids) + max_new_tokens + budget.max_tokens + 1)
        if row.length:
            n = row.length
            self.cache.prepare(b, torch.arange(n)[None], n)
            causal = torch.ones((n, n), dtype=torch.bool).tril()
            forward(self.model, self.cache, torch.tensor([list(input_ids[:-1])], device=self.device),
                    torch.arange(n, device=self.device)[None], self._additive(causal[None]), logits_to_keep=1)
        row.stats.prefill_s = time.perf_counter() - row.started
        self.rows.append(row)

    def _leave(self, finished: set[int]) -> None:
        """Finished rows leave; rows from the end move into their places (at most one move per leaver)."""
        n = len(self.rows) - len(finished)
        holes = sorted(i for i in finished if i < n)
        movers = sorted(i for i in range(n, len(self.rows)) if i not in finished)
        width = max((self.rows[i].length for i in movers), default=0)
        self.cache.move_rows(movers, holes, width)
        for hole, mover in zip(holes, movers):
            self.rows[hole] = self.rows[mover]
        self.rows = self.rows[:n]

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """Verify one draft tree per row in one forward; returns the rows that finished."""
        if not self.rows:
            return []
        t0 = time.perf_counter()
        candidates = [row.drafter.get_candidates(row.context) for row in self.rows]
        sizes = allocate([c.scores[: r.budget.max_tokens] for c, r in zip(candidates, self.rows)],
                         [r.budget.calibration for r in self.rows], self.rows[0].budget.cost)
        trees = [c.prefix(n) for c, n in zip(candidates, sizes)]
        t1 = time.perf_counter()
        ids, positions, mask = self._inputs(trees)
        logits = forward(self.model, self.cache, ids, positions, mask)
        t2 = time.perf_counter()
        paths = []
        for b, (row, tree) in enumerate(zip(self.rows, trees)):
            path, bonus = accept(logits[b, : len(tree) + 1], tree, row.rule)
            paths.append([0, *path])
            row.budget.observe(sum(tree.scores), len(path))
            self._emit(row, [tree.tokens[p - 1] for p in path] + [bonus], len(tree))
            row.pending = bonus
        self._keep_paths(paths)
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
            self._leave({i for i, r in enumerate(self.rows) if r.done})
        return finished

    def _inputs(self, trees: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[type-arg]
        """Input ids, position ids and the additive 4D mask for one step; tells the cache where each row writes."""
        batch, width = len(self.rows), max(len(t) for t in trees) + 1
        lengths = torch.tensor([row.length for row in self.rows])
        columns = lengths[:, None] + torch.arange(width)[None]
        span = int(lengths.max()) + width
        ids = torch.zeros((batch, width), dtype=torch.long)
        positions = lengths[:, None].repeat(1, width)
        visible = (torch.arange(span)[None, None, :] < lengths[:, None, None]).repeat(1, width, 1)  # own context
        for b, (row, tree) in enumerate(zip(self.rows, trees)):
            n = len(tree) + 1
            ids[b, :n] = torch.tensor([row.pending, *tree.tokens])
            positions[b, 1:n] += torch.tensor(tree.depths, dtype=torch.long)
            tree_part = torch.eye(width, dtype=torch.bool)  # padding sees itself only
            tree_part[:n, :n] = ancestor_matrix(tree.parents)
            visible[b, :, row.length : row.length + width] = tree_part
        self.cache.prepare(0, columns, span)
        return ids.to(self.device), positions.to(self.device), self._additive(visible)

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        """A (batch, 1, queries, keys) additive mask from a boolean `visible` (batch, queries, keys)."""
        mask = torch.zeros(visible.shape, dtype=self.dtype)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        return mask[:, None].to(self.device)

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

    def _keep_paths(self, paths: list[list[int]]) -> None:
        """Each row's accepted tree positions (0 = the pending token) move to the front of its tree's
        columns; its length grows by them."""
        moves = [(b, self.rows[b].length, path) for b, path in enumerate(paths) if path != list(range(len(path)))]
        if moves:
            longest = max(len(path) for _, _, path in moves)
            rows = torch.tensor([b for b, _, _ in moves])
            source = torch.tensor([[start + p for p in path] + [start] * (longest - len(path)) for _, start, path in moves])
            target = torch.tensor([[start + i for i in range(len(path))] + [start] * (longest - len(path)) for _, start, path in moves])
            self.cache.move_columns(rows, source, target)
        for row, path in zip(self.rows, paths):
            row.length += len(path)
