"""Means and spreads over seeds, and the one rule every verdict follows: a difference between two arms counts
only when it exceeds the spread of the seeds.

The spread of an arm is max - min of a metric over its seeds; the spread of a comparison is the larger of
the two arms' spreads. With a single seed there is no spread to compare with, and nothing counts. Numbers are
printed with :func:`fmt` everywhere (table and verdict line), so the verdict quotes the table exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


def fmt(value: float) -> str:
    """The one number format of tables and verdicts."""
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


@dataclass(frozen=True)
class Stats:
    """One metric of one arm over its seeds."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.finite)

    @property
    def finite(self) -> tuple[float, ...]:
        return tuple(v for v in self.values if not math.isnan(v))

    @property
    def mean(self) -> float:
        return sum(self.finite) / self.n if self.n else math.nan

    @property
    def spread(self) -> float:
        """max - min over seeds (0 for one seed, which :class:`Comparison` does not count as evidence)."""
        return max(self.finite) - min(self.finite) if self.n else math.nan

    def __str__(self) -> str:
        return f"{fmt(self.mean)} ± {fmt(self.spread)}" if self.n > 1 else fmt(self.mean)


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b``: their difference of means and whether it exceeds the seeds' spread."""

    a: Stats
    b: Stats

    @property
    def difference(self) -> float:
        return self.a.mean - self.b.mean

    @property
    def spread(self) -> float:
        return max(self.a.spread, self.b.spread)

    @property
    def measurable(self) -> bool:
        """Both arms have at least two seeds, so there is a spread to compare the difference with."""
        return self.a.n >= 2 and self.b.n >= 2

    @property
    def direction(self) -> Literal[1, 0, -1]:
        """+1: a > b beyond the spread; -1: a < b beyond it; 0: within the spread (or no spread)."""
        if not self.measurable or not abs(self.difference) > self.spread:
            return 0
        return 1 if self.difference > 0 else -1

    def text(self) -> str:
        """``0.412 vs 0.331, spread 0.020``: the numbers a verdict quotes."""
        return f"{fmt(self.a.mean)} vs {fmt(self.b.mean)}, spread {fmt(self.spread)}"


@dataclass(frozen=True)
class Results:
    """The summaries of every (arm, seed) run, by arm in report order."""

    summaries: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    """arm -> one summary dict per seed (see pipeline.experiments.arm.summarize)."""

    @property
    def arms(self) -> list[str]:
        return list(self.summaries)

    @property
    def seeds(self) -> int:
        """The fewest seeds any arm ran."""
        return min((len(runs) for runs in self.summaries.values()), default=0)

    def stats(self, arm: str, metric: str) -> Stats:
        return Stats(tuple(float(run.get(metric, math.nan)) for run in self.summaries[arm]))

    def compare(self, a: str, b: str, metric: str) -> Comparison:
        return Comparison(self.stats(a, metric), self.stats(b, metric))


Outcome = Literal["held", "contradicted", "not_shown"]


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    """held: every part of the claim exceeds the spread in the claimed direction; contradicted: some part
    exceeds it in the opposite direction; not_shown: otherwise (within the spread, or a single seed)."""
    line: str
    """One line for the report, the MLflow tag and the console, quoting the measured numbers."""

    @property
    def claim_held(self) -> bool:
        return self.outcome == "held"


def verdict(outcome: Outcome, details: str, *, seeds: int) -> Verdict:
    """The verdict line: a fixed prefix per outcome, then the measured details."""
    if outcome == "held":
        prefix = "Claim held"
    elif outcome == "contradicted":
        prefix = "Claim not held"
    elif seeds < 2:
        prefix = "Not shown at this scale (one seed: no spread to compare a difference with)"
    else:
        prefix = "Not shown at this scale (difference within spread)"
    return Verdict(outcome=outcome, line=f"{prefix}: {details}")
