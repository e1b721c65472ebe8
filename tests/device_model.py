"""A modelled device for decoder tests: the forward runs for real, its time is what a model of the device says.

The batch decoder judges drafting by how long its steps take (`StepClock`, `DraftPause`). Timed by the
machine's clock, a test of those judgments would pass or fail with the CPU it runs on and with what else
runs there; timed by this clock, every step takes what `seconds(tokens)` says and the verdict depends on
the code alone.
"""

from __future__ import annotations

from collections.abc import Callable

from workers.engine.algorithm.cost import CostModel


class ModelledDevice:
    """A clock that only steps move: a step of `tokens` tokens (the real ones of a packed step) takes
    `seconds(tokens, wide)`, `wide` when any row verifies more than one token. `attach` makes a decoder time
    itself by this clock and run its steps through it; `spend` adds time of one's own (a drafter's)."""

    def __init__(self, seconds: Callable[[int, bool], float]) -> None:
        self.seconds = seconds
        self.now = 0.0

    @classmethod
    def following(cls, cost: CostModel, wide_factor: float = 1.0) -> ModelledDevice:
        """Steps cost what `cost` says, x `wide_factor` when a row verifies drafts."""
        return cls(lambda tokens, wide: cost.cost(tokens) * (wide_factor if wide else 1.0))

    def clock(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds

    def attach(self, decoder):  # type: ignore[no-untyped-def]
        decoder.timer = self.clock
        decoder.steps = _TimedSteps(decoder.steps, self)
        return decoder


class _TimedSteps:
    """The decoder's steps, each charged to the device's clock."""

    def __init__(self, steps, device: ModelledDevice) -> None:  # type: ignore[no-untyped-def]
        self.steps, self.device = steps, device

    def __call__(self, cache, ids, positions, mask, counts=None):  # type: ignore[no-untyped-def]
        out = self.steps(cache, ids, positions, mask) if counts is None else self.steps(cache, ids, positions, mask, counts=counts)
        tokens = sum(counts) if counts is not None else ids.numel()
        self.device.spend(self.device.seconds(tokens, ids.shape[1] > 1))
        return out

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.steps, name)
