"""The cost curve: a device's step time by the number of tokens in the step, measured once per model,
device and settings (each backend measures its own: backends/) and cached as JSON here.

Verifying n tokens costs cost(n). A batch verified in one padded forward costs cost(rows x width), read
off the single-row curve by total tokens (an approximation: attention reads every row's context;
docs/under-load.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import structlog

log = structlog.get_logger()


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
