"""The draft budget: how many draft tokens to verify, from the device's cost curve.

Verifying n tokens costs cost(n) (measured on this device, this model, once, then cached).
The draft tree's scores estimate each node's chance of acceptance; recent steps calibrate
them. The budget takes the prefix of the tree (in score order) that maximises expected
tokens per second: (1 + calibration * sum(scores[:n])) / cost(1 + n).
On a CPU a 64-token verify can cost several one-token steps, so trees stay small; on a GPU it costs
about one, so the whole tree is worth sending. A batch verified in one padded forward costs
cost(rows x width), read off the single-row curve by total tokens (an approximation: attention
reads every row's context; docs/under-load.md): `allocate` picks the batch's width.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
import torch

from workers.engine.slots import SlotCache
from workers.engine.steps import StepForward
from workers.engine.verify import causal_mask, forward

if TYPE_CHECKING:
    from workers.engine.model import LoadedModel

log = structlog.get_logger()

PROBE_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)


@dataclass
class CostModel:
    """Forward time (seconds) by number of input tokens, at a typical context length."""

    seconds: dict[int, float]
    device: str = "unknown"

    def cost(self, n: int) -> float:
        sizes = sorted(self.seconds)
        if n <= sizes[0]:
            return self.seconds[sizes[0]]
        for lo, hi in pairwise(sizes):
            if n <= hi:
                t = (n - lo) / (hi - lo)
                return self.seconds[lo] * (1 - t) + self.seconds[hi] * t
        slope = (self.seconds[sizes[-1]] - self.seconds[sizes[-2]]) / (sizes[-1] - sizes[-2])
        return self.seconds[sizes[-1]] + slope * (n - sizes[-1])

    def milliseconds(self) -> dict[int, float]:
        return {n: round(1000 * t, 1) for n, t in self.seconds.items()}

    @classmethod
    def flat(cls) -> CostModel:
        """A device where any tree up to 64 costs one step (e.g. a large GPU)."""
        return cls({1: 1.0, 64: 1.0}, "flat")


@torch.inference_mode()
def measure_cost(steps: StepForward, device: torch.device, context: int = 300, repeats: int = 5,
                 sizes: tuple[int, ...] = PROBE_SIZES) -> CostModel:
    """Fastest of `repeats` timings of a decoding step of each draft size after a `context`-token prefill,
    through the steps' own forward (compiled steps: at their padded width, reading the whole cache). The
    fastest, not the median: another process on the cores only ever adds time, and a curve measured so is
    cached for every later run."""
    model = steps.model
    vocab, dtype = model.config.vocab_size, next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, context), generator=generator).to(device)
    cache = SlotCache(model)
    cache.reserve(1, context + steps.width(max(sizes) + 1))
    cache.prepare(0, torch.arange(context)[None], context)
    forward(model, cache, prompt, torch.arange(context, device=device)[None], causal_mask(context, 0, dtype).to(device))
    seconds = {}
    for n in sizes:
        width = steps.width(n)
        span = steps.span(cache, context + width)
        samples = []
        for _ in range(repeats + 1):  # the first run warms up (and compiles)
            ids = torch.randint(0, vocab, (1, width), generator=generator).to(device)
            positions = torch.arange(context, context + width)[None]
            cache.prepare(0, positions, span)  # written over the same columns every time
            positions, mask = positions.to(device), causal_mask(width, context, dtype, span).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps(cache, ids, positions, mask)
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        seconds[n] = min(samples[1:])
    return CostModel(seconds, str(device))


def load_or_measure(lm: LoadedModel, cache_dir: Path | None) -> CostModel:
    """The cost curve of this model's decoding steps on this device, measured once and cached as JSON
    (by model, device, CPU capability, dtype, packed weights, forward, threads and whether steps are compiled)."""
    capability = torch.backends.cpu.get_cpu_capability() if lm.device.type == "cpu" else torch.cuda.get_device_name(lm.device)
    compiled = "-compiled" if lm.steps.compiled else f"-{lm.forward}"
    packed = "" if lm.weights == "full" else f"-{lm.weights}w"
    key = f"{lm.model_id}-{lm.device.type}-{capability}-{lm.dtype}{packed}-{torch.get_num_threads()}t{compiled}".replace("/", "_").replace(" ", "_")
    return cached_cost(cache_dir / "cost" / f"{key}.json" if cache_dir else None, lambda: measure_cost(lm.steps, lm.device))


def plausible(cost: CostModel, slack: float = 1.15) -> bool:
    """Whether no probe costs more than `slack` times the next larger one: a step of more tokens is never
    much cheaper. A curve measured while something else ran on the cores is usually not (seen: a
    1-token probe 3x the 2-token one; 16 tokens dearer than 24)."""
    sizes = sorted(cost.seconds)
    return all(cost.seconds[a] <= slack * cost.seconds[b] for a, b in pairwise(sizes))


def cached_cost(path: Path | None, measure: Callable[[], CostModel]) -> CostModel:
    """The cost curve stored at `path` (JSON), or `measure()`d and stored there (None: never stored).
    A stored curve that is not `plausible` is measured again; a fresh one that is not gets one more try."""
    if path and path.is_file():
        data = json.loads(path.read_text())
        cost = CostModel({int(k): v for k, v in data["seconds"].items()}, data["device"])
        if plausible(cost):
            return cost
        log.warning("stored cost curve is implausible (measured on a busy machine?): measuring again", path=str(path),
                    ms=cost.milliseconds())
    cost = measure()
    if not plausible(cost):
        log.warning("cost curve implausible (is the machine busy?): measuring once more", ms=cost.milliseconds())
        cost = measure()
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"seconds": cost.seconds, "device": cost.device}, indent=1))
    return cost


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


def drafting_value(scores: list[list[float]], calibrations: list[float], cost: CostModel, retrieval_s: float,
                   accept_s: float) -> float:
    """What retrieving drafts did for a step, as a ratio of tokens per second to a step that did not
    retrieve: the best width's expected rate with the overhead counted (`retrieval_s` + `accept_s`), or, if
    no width pays, a plain step slowed by the retrieval already spent. Below 1: retrieval lost time."""
    rates = _rates(scores, calibrations, cost, retrieval_s + accept_s)
    rows = len(scores)
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
