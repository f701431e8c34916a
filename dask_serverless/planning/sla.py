"""What the user asks of a run: a statistic to plan with (the SLA) and a makespan target.

The SLA names which value of a prediction's distribution the planner plans with:

* ``"average"`` — the mean of the fitted distribution;
* ``"pN"`` (``"p50"`` … ``"p99"``, decimals allowed: ``"p99.9"``) — the N-th percentile
  on the *slow* side. Every prediction is a time (execution, transfer, start-up), so the
  p95 time is the time only 5 % of observations exceed; for a speed (bytes per second,
  work per second) that is its 5th percentile, not its 95th.

The deadline says how long the run may take:

* ``None`` — as fast as the configurations allow (the fastest predicted makespan);
* a number — that many seconds;
* ``"fastest+10%"`` — the fastest predicted makespan plus a margin (``"fastest+2s"`` for an
  absolute one); ``"fastest"`` alone is the same as ``None``.

Both parse eagerly, so an unparsable string is a ``ValueError`` before any run starts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

_PERCENTILE = re.compile(r"^p(\d{1,2}(?:\.\d+)?)$")
_FASTEST = re.compile(r"^fastest(?:\s*\+\s*(\d+(?:\.\d+)?)\s*(%|s)?)?$")
_AVERAGE_NAMES = ("average", "avg", "mean")


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0 ≤ q ≤ 1) of ``values``, interpolating linearly; 0.0 if empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


@dataclass(frozen=True)
class SLA:
    """The statistic predictions are planned with: the mean, or a slow-side percentile."""

    percentile: float | None = None

    @classmethod
    def parse(cls, value: str | SLA | None) -> SLA:
        """``"average"`` or ``"pN"`` (0 < N < 100); raises ValueError for anything else."""
        if isinstance(value, SLA):
            return value
        text = "average" if value is None else str(value).strip().lower()
        if text in _AVERAGE_NAMES:
            return cls(None)
        match = _PERCENTILE.match(text)
        if match and 0 < float(match.group(1)) < 100:
            return cls(float(match.group(1)))
        raise ValueError(f"unparsable SLA {value!r}: use 'average' or a percentile 'p50'…'p99'")

    def of_times(self, times: Sequence[float]) -> float:
        """The planned value of a sample of times: their mean or their slow-side percentile."""
        if self.percentile is None:
            return mean(times)
        return quantile(times, self.percentile / 100)

    def __str__(self) -> str:
        if self.percentile is None:
            return "average"
        return f"p{self.percentile:g}"


@dataclass(frozen=True)
class Deadline:
    """The makespan target: fixed seconds, or the fastest makespan plus a margin."""

    seconds: float | None = None
    margin_fraction: float = 0.0
    margin_seconds: float = 0.0

    @classmethod
    def parse(cls, value: float | str | Deadline | None) -> Deadline:
        if isinstance(value, Deadline):
            return value
        if value is None:
            return cls()
        if isinstance(value, int | float) and not isinstance(value, bool):
            if value <= 0:
                raise ValueError(f"a deadline must be positive, got {value}")
            return cls(seconds=float(value))
        match = _FASTEST.match(str(value).strip().lower())
        if not match:
            raise ValueError(
                f"unparsable deadline {value!r}: use seconds, 'fastest' or 'fastest+10%'"
            )
        amount, unit = match.group(1), match.group(2)
        if amount is None:
            return cls()
        if unit == "s":
            return cls(margin_seconds=float(amount))
        return cls(margin_fraction=float(amount) / 100)

    def target(self, fastest_s: float) -> float:
        """The makespan to stay within, given the fastest one the configurations allow."""
        if self.seconds is not None:
            return self.seconds
        return fastest_s * (1 + self.margin_fraction) + self.margin_seconds

    def __str__(self) -> str:
        if self.seconds is not None:
            return f"{self.seconds:g} s"
        if self.margin_seconds:
            return f"fastest+{self.margin_seconds:g}s"
        if self.margin_fraction:
            return f"fastest+{self.margin_fraction * 100:g}%"
        return "fastest"
