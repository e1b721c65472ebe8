"""Batched DARE: several requests verified in one forward pass, joining and leaving at any step.

The rows share one preallocated KV cache (`SlotCache`): row r keeps its tokens in columns
[0, length_r), in order, with no holes. Per step:

    each row drafts its tree from its own pools; the batch's draft tokens go to the rows whose
    nodes are most likely accepted, as many as the device's cost curve says pay (`allocate_packed`
    where the forward packs, `allocate` where it pads)
    one forward over [pending, *tree] per row, right-padded to the longest; row r's tokens are
    written at columns [length_r, length_r + width), and the 4D mask shows each token its own
    row's context and its tree ancestors; position ids count only the row's own tokens. A forward
    that packs (the lean forward with C++ glue) runs its linear layers on the real tokens only
    each row accepts its path (strict or relaxed); the accepted columns move to the front of
    the tree's columns and the row's length grows by them; the rest is overwritten next step

Rows that join take the free rows of the cache after the decoding ones and are prefilled there in order
of arrival (shortest first among those that arrive together), between steps: all at once while no row
decodes, else about `prefill_per_step` tokens a step, so a long prompt does not stall the decoding rows
for its whole prefill; a row joins the decoding ones when its prompt is in the cache. The chat template's head, which every prompt starts with, is computed
once and copied. A finished row leaves and a row from the end moves into its place, so the batch's rows
stay contiguous (the rows being prefilled follow them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from workers.engine.algorithm.accept import Acceptance, accept
from workers.engine.algorithm.budget import Budget, DraftPause, StepClock, allocate, allocate_packed, drafting_value
from workers.engine.algorithm.draft import Drafter, DraftTree, NoDrafter
from workers.engine.algorithm.modes import PREFILL_PER_STEP
from workers.engine.runtime.cache import SlotCache
from workers.engine.runtime.forward import additive, ancestor_matrix, causal_mask
from workers.engine.runtime.steps import StepForward

PREFILL_GROUP = 8  # rows prefilled in one forward at most
PREFILL_PADDING = 1.15  # a row joins a prefill group if it is at most this much longer than the group's mean


@dataclass
class RequestStats:
    """One request's decoding, step by step (the wire's `DecodeStats` is its summary)."""

    steps: int = 0
    new_tokens: int = 0
    accepted: list[int] = field(default_factory=list)  # tokens emitted per step (accepted drafts + 1)
    drafted: list[int] = field(default_factory=list)  # draft tokens sent per step
    drafted_by: dict[str, int] = field(default_factory=dict)  # draft tokens sent, by the label of the pool they came from
    accepted_by: dict[str, int] = field(default_factory=dict)  # draft tokens accepted, likewise
    prefill_s: float = 0.0
    stalled_s: float = 0.0  # the request stood still while other prompts were prefilled (before its own or after)
    retrieval_s: float = 0.0
    forward_s: float = 0.0
    bookkeeping_s: float = 0.0
    wall_s: float = 0.0

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted) / len(self.accepted) if self.accepted else 0.0


def count_sources(stats: RequestStats, tree: DraftTree, path: list[int]) -> None:
    """A step's draft tokens, sent and accepted (`path`: tree positions from 1), by the source each node came from
    (trees made elsewhere than `build_draft` may name none)."""
    if len(tree.sources) != len(tree):
        return
    for label in tree.sources:
        stats.drafted_by[label] = stats.drafted_by.get(label, 0) + 1
    for p in path:
        label = tree.sources[p - 1]
        stats.accepted_by[label] = stats.accepted_by.get(label, 0) + 1


@dataclass
class Finished:
    """A request the decoder is done with, under the key it was added with."""

    key: Hashable
    token_ids: list[int]
    stats: RequestStats


@dataclass
class Row:
    key: Hashable
    context: list[int]
    pending: int
    length: int  # tokens of this row in the cache (the pending token's position)
    drafter: Drafter
    budget: Budget
    rule: Acceptance
    max_new_tokens: int
    out: list[int] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)
    started: float = 0.0  # the decoder's clock when it was added
    done: bool = False
    filled: int = 0  # while prefilling: the prompt's tokens in the cache so far (then = length)

    @property
    def drafts(self) -> bool:
        return not isinstance(self.drafter, NoDrafter)


class BatchDecoder:
    def __init__(self, model: torch.nn.Module, eos_token_ids: set[int], rows: int = 1, prefix: Sequence[int] = (),
                 steps: StepForward | None = None, prefill_per_step: int = PREFILL_PER_STEP,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        """`rows`: how many rows to make room for at once (the batch size); more grow the cache.
        `prefix`: tokens most prompts start with (the chat template's head): computed once, copied
        into each such row instead of prefilled again. `steps`: the steps' forward (if None: the model's `engine_forward`, eager).
        `prefill_per_step`: prompt tokens prefilled between two steps while rows decode (0: every joining prompt whole).
        `timer`: the clock steps are timed by, in seconds (drafting is judged by those times; a test passes a
        model of a device, so that its verdict never depends on the machine's speed or load)."""
        self.model = model
        self.steps = steps or StepForward(model)
        self.room = rows
        self.eos = eos_token_ids
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.rows: list[Row] = []
        self.joining: list[Row] = []
        self.filling: list[Row] = []  # admitted, being prefilled: cache rows len(rows), len(rows) + 1, ...
        self.prefill_per_step = prefill_per_step
        self.timer = timer
        self.cache = SlotCache(model)
        self.prefix = list(prefix)
        self.prefix_kv: torch.Tensor | None = None
        self.pause = DraftPause()
        self.clock = StepClock()
        self.keep_s = {False: 0.0, True: 0.0}  # acceptance and cache bookkeeping per step, without / with drafts
        self.expected = 1.0  # the last drafting step's value as expected before its forward (`drafting_value`)
        self.emitted = 0  # tokens the current step emitted

    def __len__(self) -> int:
        return len(self.rows) + len(self.filling) + len(self.joining)

    # ------------------------------------------------------------------ joining and leaving

    def add(self, key: Hashable, input_ids: Sequence[int], drafter: Drafter, budget: Budget, rule: Acceptance,
            max_new_tokens: int) -> None:
        """Queue a request; its prefill starts before the next step."""
        if not input_ids:
            raise ValueError("empty prompt: nothing to continue")
        self.joining.append(Row(key, list(input_ids), input_ids[-1], len(input_ids) - 1, drafter, budget, rule, max_new_tokens,
                                started=self.timer()))

    def _admit(self) -> None:
        """Queued rows take the next free rows of the cache, after the decoding and filling ones, shortest
        first; rows starting with the shared prefix get its keys/values copied. `_fill` prefills the rest."""
        joining = sorted(self.joining, key=lambda r: (self._shared(r), r.length))
        self.joining = []
        need = max(len(r.context) + r.max_new_tokens + r.budget.max_tokens + 1 for r in joining)
        self.cache.reserve(max(len(self.rows) + len(self.filling) + len(joining), self.room), need)
        for row in joining:
            index, shared = len(self.rows) + len(self.filling), self._shared(row)
            if shared and self.prefix_kv is None:  # computed once, in the first such row
                self._forward_prefill(index, [self.prefix], 0)
                self.prefix_kv = self.cache.data[:, :, index, :, :shared].clone()
            if shared:
                self.cache.data[:, :, index, :, :shared] = self.prefix_kv
            row.filled = shared
            self.filling.append(row)

    def _fill(self) -> None:
        """Prefill the filling rows in order: all of them while no row decodes, else calls until about
        `prefill_per_step` tokens (at least one call; 0: all). A call is the same whatever runs beside it
        or however the prefill is spread over steps (so a row's cache is too): with a `prefill_chunk`, one
        chunk of one prompt, at offsets shared, shared + chunk, ...; else one group of rows of similar
        length, whole. A row whose prompt is in the cache joins the decoding rows."""
        limit = self.prefill_per_step if self.rows and self.prefill_per_step else None
        chunk, spent = self.steps.forward.prefill_chunk, 0
        while self.filling and (limit is None or spent < limit):
            start, first = self.timer(), len(self.rows)
            group = [self.filling[0]] if chunk else self._group()
            end = [min(r.filled + chunk, r.length) if chunk else r.length for r in group]
            tokens = [r.context[r.filled : e] for r, e in zip(group, end)]
            if any(tokens):
                self._forward_prefill_rows(first, tokens, group[0].filled)
            spent_s = self.timer() - start
            for row, e in zip(group, end):  # a row's share of its group's call is its own; it waited for the rest
                row.filled = e
                row.stats.prefill_s += spent_s / len(group)
                row.stats.stalled_s += spent_s - spent_s / len(group)
            for row in [*self.rows, *self.filling[len(group):]]:  # decoding, or waiting for their own prefill
                row.stats.stalled_s += spent_s
            spent += max(len(t) for t in tokens)
            while self.filling and self.filling[0].filled == self.filling[0].length:
                self.rows.append(self.filling.pop(0))

    def _group(self) -> list[Row]:
        """The first filling rows that share a prefill forward: as many as PREFILL_GROUP, of the same
        prefilled offset, each at most PREFILL_PADDING times their mean length (padding is computed)."""
        group = [self.filling[0]]
        for row in self.filling[1 : PREFILL_GROUP]:
            if row.filled != group[0].filled or row.length > PREFILL_PADDING * sum(r.length for r in group) / len(group):
                break
            group.append(row)
        return group

    def _shared(self, row: Row) -> int:
        """How many of the row's tokens come from the shared prefix."""
        p = len(self.prefix)
        return p if p and row.length > p and row.context[:p] == self.prefix else 0

    def _forward_prefill(self, first: int, tokens: list[list[int]], offset: int) -> None:
        """Rows [first, first + len(tokens)) take `tokens` at columns (and positions) offset.., seeing
        columns [0, offset) and their own earlier tokens; shorter rows are right-padded. A forward with a
        `prefill_chunk` takes each row alone, in chunks at offset, offset + chunk, ...: the same calls for a
        prompt whatever is prefilled beside it."""
        chunk = self.steps.forward.prefill_chunk
        if chunk:
            for row, t in enumerate(tokens):
                for start in range(0, len(t), chunk):
                    self._forward_prefill_rows(first + row, [t[start : start + chunk]], offset + start)
        else:
            self._forward_prefill_rows(first, tokens, offset)

    def _forward_prefill_rows(self, first: int, tokens: list[list[int]], offset: int) -> None:
        n = max(len(t) for t in tokens)
        ids = torch.tensor([t + [0] * (n - len(t)) for t in tokens], device=self.device)
        positions = torch.arange(offset, offset + n)[None].repeat(len(tokens), 1)
        self.cache.prepare(first, positions, offset + n)
        mask = causal_mask(n, offset, self.dtype).expand(len(tokens), -1, -1, -1).to(self.device)
        self.steps.forward(self.cache, ids, positions.to(self.device), mask, logits_to_keep=1, prefill=True)

    def _leave(self, finished: set[int]) -> None:
        """Finished rows leave; rows from the end move into their places (at most one move per leaver);
        the rows being prefilled move down behind them."""
        was, n = len(self.rows), len(self.rows) - len(finished)
        holes = sorted(i for i in finished if i < n)
        movers = sorted(i for i in range(n, len(self.rows)) if i not in finished)
        width = max((self.rows[i].length for i in movers), default=0)
        self.cache.move_rows(movers, holes, width)
        for hole, mover in zip(holes, movers):
            self.rows[hole] = self.rows[mover]
        self.rows = self.rows[:n]
        filled = max((r.filled for r in self.filling), default=0)
        self.cache.move_rows(list(range(was, was + len(self.filling))) if filled else [],
                             list(range(n, n + len(self.filling))), filled)

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """Verify one draft tree per row in one forward; returns the rows that finished."""
        if self.joining:
            self._admit()
        if self.filling:
            self._fill()
        if not self.rows:
            return []
        t0 = self.timer()
        trees, drafting = self._draft()
        t1 = self.timer()
        rows, cost, self.emitted = len(self.rows), self.rows[0].budget.cost, 0
        ids, positions, mask = self._inputs(trees)
        counts = [len(t) + 1 for t in trees]
        if self.steps.packs and drafting and len(set(counts)) > 1:  # padding is not computed; logits come packed
            packed = self.steps(self.cache, ids, positions, mask, counts=counts)
            logits = packed.split(counts)
        else:
            logits = self.steps(self.cache, ids, positions, mask)
        t2 = self.timer()
        paths = []
        for b, (row, tree) in enumerate(zip(self.rows, trees)):
            path, bonus = accept(logits[b][: len(tree) + 1], tree, row.rule)
            paths.append([0, *path])
            row.budget.observe(sum(tree.scores), len(path))
            count_sources(row.stats, tree, path)
            self._emit(row, [tree.tokens[p - 1] for p in path] + [bonus], len(tree))
            row.pending = bonus
        self._keep_paths(paths)
        t3 = self.timer()
        self.keep_s[drafting] = 0.8 * self.keep_s[drafting] + 0.2 * (t3 - t2)
        if drafting:  # judged by what it did where a plain step has been timed, else by what it promised
            gain = self.clock.gain(t3 - t0, self.emitted, rows, cost)
            self.pause.judge(self.expected if gain is None else gain, rows)
        elif any(row.drafts for row in self.rows):
            self.clock.plain(t3 - t0, rows, cost)
        for row in self.rows:  # the shared forward's time is every row's time
            row.stats.retrieval_s += (t1 - t0) / len(self.rows)
            row.stats.forward_s += t2 - t1
            row.stats.bookkeeping_s += (t3 - t2) / len(self.rows)
        finished = []
        for row in self.rows:
            if row.done:
                row.stats.new_tokens, row.stats.wall_s = len(row.out), self.timer() - row.started
                finished.append(Finished(row.key, row.out, row.stats))
        if finished:
            self._leave({i for i, r in enumerate(self.rows) if r.done})
        return finished

    def _draft(self) -> tuple[list[DraftTree], bool]:
        """Each row's draft tree, cut to what pays (`allocate`); whether retrieval ran. Retrieval runs unless
        it has lately not paid for itself at this batch (`DraftPause`)."""
        rows = len(self.rows)
        if not any(row.drafts for row in self.rows) or not self.pause.drafting(rows) or self.clock.wants_plain(rows):
            return [DraftTree() for _ in self.rows], False
        start = self.timer()
        candidates = [row.drafter.get_candidates(row.context) if row.drafts else DraftTree() for row in self.rows]
        retrieval_s = self.timer() - start
        scores = [c.scores[: r.budget.max_tokens] for c, r in zip(candidates, self.rows)]
        calibrations = [r.budget.calibration for r in self.rows]
        cost = self.rows[0].budget.cost
        # retrieval is spent: send what pays from here on
        if self.steps.packs:  # each row its own number of tokens, against a plain step as timed at these rows
            ratio = self.clock.ratio
            plain_s = None if ratio is None else ratio * cost.cost(rows)
            sizes = allocate_packed(scores, calibrations, cost, plain_s=plain_s)
        else:  # every row pays for the widest row's tokens
            plain_s, sizes = None, allocate(scores, calibrations, cost)
        accept_s = max(0.0, self.keep_s[True] - self.keep_s[False])
        self.expected = drafting_value(scores, calibrations, cost, retrieval_s, accept_s, self.steps.packs, plain_s)
        return [c.prefix(n) for c, n in zip(candidates, sizes)], True

    def _inputs(self, trees: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[type-arg]
        """Input ids, position ids and the additive 4D mask for one step; tells the cache where each row writes."""
        batch, width = len(self.rows), self.steps.width(max(len(t) for t in trees) + 1)
        lengths = torch.tensor([row.length for row in self.rows])
        columns = lengths[:, None] + torch.arange(width)[None]
        span = self.steps.span(self.cache, int(lengths.max()) + width)
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
        return ids.to(self.device), positions.to(self.device), additive(visible, self.dtype)[:, None].to(self.device)

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
        self.emitted += len(new)
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
