"""Predictions from history: execution time, output size, transfer and start-up times.

The model (see docs: "The planner's model"):

* **Execution time** of function *f* at memory *m* with input bytes *s* is a line with an
  intercept, ``t = a + b·s``, fitted by least squares to *f*'s samples at *m* (slope
  clamped at 0). The intercept matters: a constant-time task is predicted constant
  whatever its input, so a chain of 500 ms tasks is predicted 500 ms per task all the way
  down (the origin system, which stored time per input byte, predicted 500, 7 754,
  15 007 … ms).
* **Across memory sizes** a serverless platform scales CPU with memory: *m* MB give
  ``m / 1769`` vCPU (capped at the machine's cores). A task runs at a *speed* of its CPU
  share up to the threads it can use (one, for Python code holding the GIL), so an
  unmeasured size is predicted from the nearest measured one as
  ``t(m) = t(m₀) · (speed(m₀) / speed(m))^k`` with ``k = 1``; once two measured sizes
  differ in speed, ``k`` is fitted to them (``k ≈ 0`` for a task that sleeps or waits on
  I/O, ``k ≈ 1`` for one that computes). Measured sizes are always used directly.
* **Output size** of *f*: a line with intercept in the input size, over all memory sizes.
* **Transfer time** of *n* bytes at memory *m*: a line ``latency + n / bandwidth``
  fitted to measured reads and writes at *m* (or at any size when *m* has none).
* **Start-up** of an invocation at *m*: cold and warm separately, mixed by how often
  starts at *m* were cold (a size never used starts cold, taking the nearest measured
  size's cold start). An invocation pays it once, however many tasks it runs. Start-up
  is the platform's (instance boot, or hand-over to a warm instance), not time spent
  queued behind a concurrency limit, which the model leaves out.

Which value of a fitted distribution is predicted is the SLA's choice (``sla.SLA``): the
average, or a slow-side percentile of the residuals around the fitted line (a p95 time —
the 5th-percentile speed). Every prediction is a time, so "slow side" is always "high".

A ``Predictor`` is built from one ``History`` snapshot and holds no global state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from dask_serverless.constants import MB_PER_VCPU
from dask_serverless.planning.history import History
from dask_serverless.planning.sla import SLA, mean

# Memory a worker needs besides its data: the interpreter and the preloaded libraries.
RUNTIME_MB = 128.0
# Bytes of memory per byte of input or output a task holds (copies, deserialisation).
DATA_MEMORY_FACTOR = 2.0
# What is assumed before anything was measured.
DEFAULT_COLD_START_S = 0.1
DEFAULT_WARM_START_S = 0.005
DEFAULT_LATENCY_S = 0.001
DEFAULT_BANDWIDTH_BPS = 100e6
MAX_EXPONENT = 1.5


@dataclass(frozen=True)
class CpuModel:
    """How memory buys CPU: ``m / mb_per_vcpu`` vCPU, at most ``max_vcpus``."""

    mb_per_vcpu: float = MB_PER_VCPU
    max_vcpus: float = field(default_factory=lambda: float(os.cpu_count() or 1))
    task_threads: float = 1.0

    def share(self, memory_mb: float) -> float:
        return min(memory_mb / self.mb_per_vcpu, self.max_vcpus)

    def speed(self, memory_mb: float) -> float:
        """Relative speed of a task that can use ``task_threads`` threads."""
        return min(self.share(memory_mb), self.task_threads)


@dataclass(frozen=True)
class Line:
    """``intercept + slope·x`` (never below 0) plus ``tail``, the SLA's residual."""

    intercept: float
    slope: float
    tail: float = 0.0

    def at(self, x: float) -> float:
        return max(0.0, self.intercept + self.slope * x + self.tail)

    def scaled(self, factor: float) -> Line:
        return Line(self.intercept * factor, self.slope * factor, self.tail * factor)


def fit_line(xs: Sequence[float], ys: Sequence[float], sla: SLA) -> Line:
    """Least-squares line with intercept (slope ≥ 0), its tail the SLA's residual."""
    if not ys:
        return Line(0.0, 0.0)
    mean_x, mean_y = mean(xs), mean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = 0.0
    if spread > 0:
        slope = max(
            0.0, sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
        )
    intercept = mean_y - slope * mean_x
    residuals = [y - (intercept + slope * x) for x, y in zip(xs, ys, strict=True)]
    return Line(intercept, slope, sla.of_times(residuals))


def speed_exponent(points: Sequence[tuple[float, float]]) -> float:
    """``k`` in ``t ∝ speed^-k`` fitted to ``(speed, time)`` points (clamped to 0…1.5)."""
    usable = [(math.log(s), math.log(t)) for s, t in points if s > 0 and t > 0]
    if len({round(s, 9) for s, _t in usable}) < 2:
        return 1.0
    xs, ys = [s for s, _ in usable], [t for _, t in usable]
    mean_x, mean_y = mean(xs), mean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in usable) / sum((x - mean_x) ** 2 for x in xs)
    return min(MAX_EXPONENT, max(0.0, -slope))


@dataclass(frozen=True)
class Startup:
    cold_s: float
    warm_s: float
    cold_fraction: float

    @property
    def expected_s(self) -> float:
        return self.cold_fraction * self.cold_s + (1 - self.cold_fraction) * self.warm_s


class Predictor:
    """Predictions for one plan, from one history snapshot, under one SLA."""

    def __init__(self, history: History, sla: SLA, cpu: CpuModel | None = None) -> None:
        self.history = history
        self.sla = sla
        self.cpu = cpu or CpuModel()
        self._measured: dict[str, dict[int, Line]] = {}
        self._typical_input: dict[str, float] = {}
        self._largest: dict[str, tuple[float, float]] = {}
        self._outputs: dict[str, Line] = {}
        self._exponents: dict[str, float] = {}
        self._exec_cache: dict[tuple[str, int], Line] = {}
        by_function: dict[str, list[Sequence[float]]] = {}
        for (function, memory), samples in history.tasks.items():
            xs = [s[0] for s in samples]
            self._measured.setdefault(function, {})[memory] = fit_line(
                xs, [s[2] for s in samples], sla
            )
            by_function.setdefault(function, []).extend(samples)
        average = SLA(None)
        for function, pooled in by_function.items():
            self._typical_input[function] = mean([s[0] for s in pooled])
            self._largest[function] = (max(s[0] for s in pooled), max(s[1] for s in pooled))
            self._outputs[function] = fit_line(
                [s[0] for s in pooled], [s[1] for s in pooled], average
            )
        self._transfers = {
            m: fit_line([s[0] for s in ss], [s[1] for s in ss], sla)
            for m, ss in history.transfers.items()
        }
        pooled = [s for ss in history.transfers.values() for s in ss]
        self._pooled_transfer = (
            fit_line([s[0] for s in pooled], [s[1] for s in pooled], sla)
            if pooled
            else Line(DEFAULT_LATENCY_S, 1 / DEFAULT_BANDWIDTH_BPS)
        )
        self._startups = {m: self._startup_of(ss) for m, ss in history.startups.items()}
        self._pooled_startup = self._startup_of([s for ss in history.startups.values() for s in ss])

    # -- execution -----------------------------------------------------------------------

    def knows(self, function: str) -> bool:
        return function in self._measured

    def exec_line(self, function: str, memory_mb: int) -> Line | None:
        """The fitted (or scaled) execution-time line of ``function`` at ``memory_mb``."""
        measured = self._measured.get(function)
        if not measured:
            return None
        cached = self._exec_cache.get((function, memory_mb))
        if cached is not None:
            return cached
        line = measured.get(memory_mb)
        if line is None:
            target = self.cpu.speed(memory_mb)
            reference = min(measured, key=lambda m: (abs(math.log(self.cpu.speed(m) / target)), -m))
            ratio = self.cpu.speed(reference) / target
            line = measured[reference].scaled(ratio ** self._exponent(function))
        self._exec_cache[(function, memory_mb)] = line
        return line

    def exec_time(self, function: str, input_bytes: float, memory_mb: int) -> float:
        """Predicted execution seconds; 0.0 for a function without history."""
        line = self.exec_line(function, memory_mb)
        return 0.0 if line is None else line.at(input_bytes)

    def work_bound_s(self, function: str, memory_mb: int) -> float | None:
        """Execution seconds at the largest input ``function`` was seen with; None if unknown."""
        if function not in self._largest:
            return None
        return self.exec_time(function, self._largest[function][0], memory_mb)

    def need_bound_mb(self, function: str) -> float:
        """Memory ``function`` needs at the largest input and output it was seen with."""
        largest_input, largest_output = self._largest.get(function, (0.0, 0.0))
        return self.memory_need_mb(largest_input, largest_output)

    def _exponent(self, function: str) -> float:
        if function not in self._exponents:
            typical = self._typical_input[function]
            points = [
                (self.cpu.speed(m), line.at(typical))
                for m, line in self._measured[function].items()
            ]
            self._exponents[function] = speed_exponent(points)
        return self._exponents[function]

    # -- data ----------------------------------------------------------------------------

    def output_bytes(self, function: str, input_bytes: float) -> float:
        line = self._outputs.get(function)
        return 0.0 if line is None else line.at(input_bytes)

    def transfer_time(self, nbytes: float, memory_mb: int) -> float:
        """Seconds to read or write ``nbytes`` from a worker of ``memory_mb``."""
        return self._transfers.get(memory_mb, self._pooled_transfer).at(nbytes)

    @staticmethod
    def memory_need_mb(input_bytes: float, output_bytes: float) -> float:
        """Memory a task needs: the runtime plus a multiple of the data it holds."""
        return RUNTIME_MB + DATA_MEMORY_FACTOR * (input_bytes + output_bytes) / 2**20

    # -- start-up ------------------------------------------------------------------------

    def _startup_of(self, samples: Sequence[Sequence[float]]) -> Startup:
        cold = [s[1] for s in samples if s[0]]
        warm = [s[1] for s in samples if not s[0]]
        return Startup(
            self.sla.of_times(cold) if cold else DEFAULT_COLD_START_S,
            self.sla.of_times(warm) if warm else DEFAULT_WARM_START_S,
            len(cold) / len(samples) if samples else 1.0,
        )

    def startup(self, memory_mb: int) -> Startup:
        """Start-up at ``memory_mb``; at a size never used, a cold start of the nearest."""
        if memory_mb in self._startups or not self._startups:
            return self._startups.get(memory_mb, self._pooled_startup)
        nearest = min(self._startups, key=lambda m: (abs(math.log(m / memory_mb)), -m))
        return replace(self._startups[nearest], cold_fraction=1.0)

    def startup_time(self, memory_mb: int) -> float:
        """Expected start-up of one invocation at ``memory_mb`` (cold and warm mixed)."""
        return self.startup(memory_mb).expected_s
