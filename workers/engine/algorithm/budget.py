"""The draft budget: how many draft tokens to verify, from the device's cost curve (cost.py).

The draft tree's scores estimate each node's chance of acceptance; recent steps calibrate
them. The budget takes the prefix of the tree (in score order) that maximises expected
tokens per second: (1 + calibration * sum(scores[:n])) / cost(1 + n).
On a CPU a 64-token verify can cost several one-token steps, so trees stay small; on a GPU it costs
about one, so the whole tree is worth sending. `allocate` picks a padded batch's width, `allocate_packed` a
packed batch's tokens row by row; `StepClock` and
`DraftPause` judge drafting at width by measured step times (docs/under-load.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.engine.algorithm.cost import CostModel


@dataclass
class Budget:
    """One request's draft limit and how well its tree's scores predict acceptance (learnt step by step);
    `allocate` sizes the drafts from it."""

    cost: CostModel
    max_tokens: int = 64
    calibration: float = 1.0
    decay: float = 0.8
    history: list[tuple[float, int]] = field(default_factory=list)

    def observe(self, predicted: float, accepted: int) -> None:
        """After a step: `predicted` was the sum of the sent nodes' scores, `accepted` what the model took."""
        if predicted <= 0:
            return
        ratio = min(3.0, (accepted + 0.1) / (predicted + 0.1))
        self.calibration = self.decay * self.calibration + (1 - self.decay) * ratio


def _rates(scores: list[list[float]], calibrations: list[float], cost: CostModel, overhead_s: float) -> list[float]:
    """Expected tokens per second of the batch by draft width (index 0: no drafts, no overhead)."""
    rows = len(scores)
    rates, expected = [rows / cost.cost(rows)], float(rows)
    for width in range(1, max((len(s) for s in scores), default=0) + 1):
        expected += sum(c * s[width - 1] for s, c in zip(scores, calibrations) if len(s) >= width)
        rates.append(expected / (cost.cost(rows * (width + 1)) + overhead_s))
    return rates


def allocate(scores: list[list[float]], calibrations: list[float], cost: CostModel, overhead_s: float = 0.0) -> list[int]:
    """Draft sizes for a batch verified in one padded forward, whose cost is set by its widest row:
    cost(rows x width). The width maximises the batch's expected tokens per second,
    (rows + each row's calibrated scores up to the width) / (cost(rows x width) + overhead_s), against
    rows / cost(rows) for no drafts at all; `overhead_s` is what drafting adds to a step besides the
    forward (retrieval, relaxed acceptance). Every row whose drafts can pass fills the width (padding
    costs the same); a row whose drafts never pass sends none."""
    rates = _rates(scores, calibrations, cost, overhead_s)
    best_width = max(range(len(rates)), key=lambda w: (rates[w], -w))
    return [min(best_width, len(s)) if c > 0 else 0 for s, c in zip(scores, calibrations)]


def _ranked(scores: list[list[float]], calibrations: list[float]) -> list[tuple[float, int]]:
    """Every row's draft nodes as (calibrated score, row), best first (a row's scores never rise, so the
    first n of a row taken are its tree's prefix of n)."""
    return sorted(((c * s, r) for r, (row, c) in enumerate(zip(scores, calibrations)) if c > 0 for s in row), reverse=True)


def _packed_rates(ranked: list[tuple[float, int]], rows: int, cost: CostModel, overhead_s: float,
                  plain_s: float | None) -> list[float]:
    """Expected tokens per second of a packed batch by draft tokens taken best first (index 0: none, no
    overhead). A step of rows + n tokens costs `plain_s` (a plain step's time, measured; else cost(rows)) plus
    what the curve adds for the n tokens: what a wide batch's step costs beyond the curve (attention over every
    row's context, per-row work) is paid by the plain step too."""
    base = cost.cost(rows)
    plain = base if plain_s is None else plain_s
    rates, expected = [rows / plain], float(rows)
    for n, (gain, _) in enumerate(ranked, start=1):
        expected += gain
        rates.append(expected / (plain + cost.cost(rows + n) - base + overhead_s))
    return rates


def allocate_packed(scores: list[list[float]], calibrations: list[float], cost: CostModel, rows: int | None = None,
                    overhead_s: float = 0.0, plain_s: float | None = None) -> list[int]:
    """Draft sizes for a batch whose forward computes only real tokens (a packed forward: vLLM's, or the lean
    forward with `counts`): each row sends its own number. Draft tokens are taken best first, over all rows, as
    many as maximise the batch's expected tokens per second ((rows + calibrated scores taken) / (its step's
    cost + `overhead_s`)) against a plain step's; `rows` (default: one per score list) counts rows that draft
    nothing too; `plain_s`: a plain step's measured time (`_packed_rates`)."""
    rows = len(scores) if rows is None else rows
    ranked = _ranked(scores, calibrations)
    rates = _packed_rates(ranked, rows, cost, overhead_s, plain_s)
    best = max(range(len(rates)), key=lambda n: (rates[n], -n))
    sizes = [0] * len(scores)
    for _, r in ranked[:best]:
        sizes[r] += 1
    return sizes


def drafting_value(scores: list[list[float]], calibrations: list[float], cost: CostModel, retrieval_s: float,
                   accept_s: float, packed: bool = False, plain_s: float | None = None) -> float:
    """What retrieving drafts did for a step, as a ratio of tokens per second to a step that did not
    retrieve: the best width's (`packed`: the best number of tokens') expected rate with the overhead counted
    (`retrieval_s` + `accept_s`), or, if none pays, a plain step slowed by the retrieval already spent. Below 1:
    retrieval lost time."""
    rows = len(scores)
    if packed:
        rates = _packed_rates(_ranked(scores, calibrations), rows, cost, retrieval_s + accept_s, plain_s)
        plain = rows / (rows / rates[0] + retrieval_s)
    else:
        rates = _rates(scores, calibrations, cost, retrieval_s + accept_s)
        plain = rows / (cost.cost(rows) + retrieval_s)
    return max([plain, *rates[1:]]) / rates[0]


@dataclass
class StepClock:
    """What this batch's steps take on the device, against the cost curve. The curve is one request's
    step by tokens; a batch's step differs (attention reads every row's context, the machine's speed
    drifts), so a drafting step is judged by what it did, measured: its tokens per second against a plain
    step's at the same rows. A plain step's time is the median of the last `keep` plain steps' ratios to
    cost(rows) (`ratio`; a single slow step — the first after a start, a pause of the machine — does not set
    it), trusted from `trusted` samples on. Samples come from the plain steps of pauses and, while fewer
    than `trusted` or once a batch of `probe_rows` or more has drafted `stale_after` steps in a row, from
    plain steps taken to measure (`wants_plain`). A batch below `probe_rows` never spends a step on
    measuring: few rows leave a step bound by reading the weights, where drafts are nearly free."""

    probe_rows: int = 4
    stale_after: int = 32
    keep: int = 5
    trusted: int = 3
    samples: list[float] = field(default_factory=list)
    since: int = 0  # drafting steps since the last plain one

    @property
    def ratio(self) -> float | None:
        if len(self.samples) < self.trusted:
            return None
        ordered = sorted(self.samples)
        return ordered[len(ordered) // 2]

    def wants_plain(self, rows: int) -> bool:
        return rows >= self.probe_rows and (len(self.samples) < self.trusted or self.since >= self.stale_after)

    def plain(self, seconds: float, rows: int, cost: CostModel) -> None:
        """After a step that did not retrieve: its whole time (forward and bookkeeping)."""
        self.samples = [*self.samples, seconds / cost.cost(rows)][-self.keep :]
        self.since = 0

    def gain(self, seconds: float, emitted: int, rows: int, cost: CostModel) -> float | None:
        """After a drafting step (retrieval, forward and acceptance in `seconds`, `emitted` tokens): its
        tokens per second over a plain step's at these rows; None until plain steps are trusted."""
        self.since += 1
        ratio = self.ratio
        if ratio is None or seconds <= 0:
            return None
        return (emitted / seconds) / (rows / (ratio * cost.cost(rows)))


@dataclass
class DraftPause:
    """Retrieval is skipped while it does not pay for the batch (a compute-bound device at a wide batch,
    or requests whose pools hold nothing like them): the value of recent drafting steps (measured by
    `StepClock.gain`, else expected by `drafting_value`; averaged) below 1 pauses retrieval for `backoff`
    steps, doubling (to `longest`) while probes after a pause still do not pay. A batch that has shrunk to
    `resume_share` of its rows at the pause or fewer drafts again at once (one row leaving a full batch
    does not: it is back at the next poll)."""

    longest: int = 16
    decay: float = 0.7
    value: float = 1.5  # optimistic at first: drafting is tried
    backoff: int = 1
    remaining: int = 0
    rows_at_pause: int = 0
    resume_share: float = 0.75

    def drafting(self, rows: int) -> bool:
        """Whether this step retrieves drafts (counts a paused step down)."""
        if self.remaining and rows <= self.resume_share * self.rows_at_pause:
            self.remaining, self.backoff, self.value = 0, 1, 1.5
        if self.remaining:
            self.remaining -= 1
            return False
        return True

    def judge(self, value: float, rows: int) -> None:
        """After a drafting step: its `drafting_value`."""
        self.value = self.decay * self.value + (1 - self.decay) * value
        if self.value >= 1.0:
            self.backoff = 1
            return
        self.remaining, self.rows_at_pause = self.backoff, rows
        self.backoff = min(2 * self.backoff, self.longest)
