"""Predictions from history: execution time, output size, memory need, transfers, start-up.

The model (see docs: "The planner's model"):

* **Execution time** of function *f* at memory *m* with input bytes *s* has two parts.
  A serverless platform scales CPU with memory: *m* MB give ``m / 1769`` vCPU (capped at
  the machine's cores), so a task runs its CPU work at a *speed* ``min(share(m), p)``,
  ``p`` the threads it can use (one, for Python code holding the GIL; more when its CPU
  time was seen to exceed its wall time). Every task records its CPU time beside its wall
  time, so each sample splits into CPU work ``c`` (CPU seconds, the same at every size)
  and the rest, ``w − c / speed(m)`` — waiting on I/O, sleeping — which memory does not
  buy. Both parts are lines with an intercept in *s* (``a + b·s``, slope ≥ 0) fitted by
  least squares to the samples of *every* size together::

      t(s, m) = io(s) + cpu(s) / speed(m)

  So sizes of equal speed are pooled (1769 and 3008 MB are one sample for a
  single-threaded task), a size never measured is predicted from the model rather than
  penalised, a ``sleep`` measured at one size is predicted the same at every size, and
  the prediction never increases with memory. The intercept keeps a constant-time task
  constant whatever its input (the origin system, which stored time per input byte,
  predicted a fixed 500 ms task at 7 754, 15 007 … ms down a chain).
* **Calibration**: after every run each task's measured work is compared with what the
  plan's model predicted for it; the median of a function's recent ratios (its *bias*:
  what the fitted lines do not follow) scales its predictions — for a function seen with
  more than one input size. One seen with a single input size is predicted by the medians
  of its newest samples, which already are those tasks: a bias would count their drift
  twice.
* **Error margins are relative**: each sample's ratio of measured to predicted time is
  kept per function, and the SLA's percentile is applied to the makespan by drawing those
  ratios, centred on 1 (``planning.simulate.makespan_quantile``), never by adding
  per-task percentiles along a path.
* **Output size** of *f*: a line with intercept in the input size, over all sizes.
* **Memory need** of *f*: the largest peak memory measured (cgroup accounting, or the
  process's peak) for its input size, times ``MEMORY_HEADROOM``; at least the next size
  above any size it ran out of memory at; before any peak was measured, the runtime plus
  a multiple of the data it holds.
* **Transfer time** of *n* bytes at memory *m*: a line ``latency + n / bandwidth``
  fitted to measured reads and writes at *m* (or at any size when *m* has none).
* **Start-up** of an invocation: cold (an instance's boot to ready, plus the hand-over)
  and warm (the hand-over) separately, measured at every size together; the quickest
  cold start is the boot's own work, which instances booting together on one machine
  share. Whether
  an invocation starts cold is the platform model's business (``planning.simulate``),
  not history's.

Predictions are means; which value of the makespan's distribution is planned with is the
SLA's choice (``sla.SLA``). A ``Predictor`` is built from one ``History`` snapshot and
holds no global state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import median

from dask_serverless.constants import MB_PER_VCPU
from dask_serverless.planning.history import History
from dask_serverless.planning.sla import SLA, mean

# Memory a worker needs besides its data: the interpreter and the preloaded libraries.
RUNTIME_MB = 128.0
# Bytes of memory per byte of input or output a task holds (copies, deserialisation).
DATA_MEMORY_FACTOR = 2.0
# A task is planned at no less than its measured peak times this.
MEMORY_HEADROOM = 1.2
# What is assumed before anything was measured.
DEFAULT_COLD_START_S = 0.1
DEFAULT_WARM_START_S = 0.005
DEFAULT_LATENCY_S = 0.001
DEFAULT_BANDWIDTH_BPS = 100e6
# A transfer this large takes measurably longer than an empty one: only such transfers
# say anything about the bandwidth (per byte), the smaller ones give the latency.
BANDWIDTH_SAMPLE_BYTES = 64 * 2**10
# Residuals a function needs before they calibrate it, and how far they may move it.
CALIBRATION_SAMPLES = 3
BIAS_RANGE = (0.5, 4.0)


@dataclass(frozen=True)
class CpuModel:
    """How memory buys CPU: ``m / mb_per_vcpu`` vCPU, at most ``max_vcpus``."""

    mb_per_vcpu: float = MB_PER_VCPU
    max_vcpus: float = field(default_factory=lambda: float(os.cpu_count() or 1))
    task_threads: float = 1.0

    def share(self, memory_mb: float) -> float:
        return min(memory_mb / self.mb_per_vcpu, self.max_vcpus)

    def speed(self, memory_mb: float, threads: float | None = None) -> float:
        """Relative speed of a task that can use ``threads`` (default ``task_threads``)."""
        return min(self.share(memory_mb), self.task_threads if threads is None else threads)


@dataclass(frozen=True)
class Line:
    """``intercept + slope·x``, never below 0."""

    intercept: float
    slope: float

    def at(self, x: float) -> float:
        return max(0.0, self.intercept + self.slope * x)


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> Line:
    """Least-squares line with intercept (slope ≥ 0)."""
    if not ys:
        return Line(0.0, 0.0)
    mean_x, mean_y = mean(xs), mean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = 0.0
    if spread > 0:
        slope = max(
            0.0, sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
        )
    return Line(mean_y - slope * mean_x, slope)


def transfer_line(samples: Sequence[Sequence[float]]) -> Line:
    """Latency plus bytes over bandwidth, from ``[bytes, seconds]`` transfer samples.

    The latency is the median time of the small transfers, the time per byte the median
    of the large ones' (``BANDWIDTH_SAMPLE_BYTES``) time beyond that latency per byte:
    medians, so a transfer that waited for a CPU on a busy machine moves neither. Not a
    least-squares line: a run that moved only counters (a few bytes each) spans too few
    bytes to show a bandwidth, and their jitter alone would extrapolate to seconds per
    megabyte. Either part not measured yet is the default.
    """
    small = [s[1] for s in samples if s[0] < BANDWIDTH_SAMPLE_BYTES]
    latency = median(small) if small else DEFAULT_LATENCY_S
    per_byte = [max(0.0, s[1] - latency) / s[0] for s in samples if s[0] >= BANDWIDTH_SAMPLE_BYTES]
    return Line(latency, median(per_byte) if per_byte else 1 / DEFAULT_BANDWIDTH_BPS)


def robust_line(xs: Sequence[float], ys: Sequence[float]) -> Line:
    """``fit_line``, or the median when the inputs do not vary (one noisy sample among
    equal inputs must not move the prediction as a mean would)."""
    if not ys:
        return Line(0.0, 0.0)
    if max(xs) - min(xs) <= 1e-9 * max(1.0, abs(max(xs))):
        return Line(median(ys), 0.0)
    return fit_line(xs, ys)


@dataclass(frozen=True)
class ExecModel:
    """``io(s) + cpu(s) / speed(m)`` of one function, and its relative residuals.

    ``speed(m)`` is the CPU share's speed, ``min(m / 1769, threads)``, times the
    *efficiency* measured at shares below the task's threads: a small CPU quota runs a task
    slower than its share (it is throttled in slices). Efficiency is 1 until measured,
    interpolated between measured shares, and the speed never falls with memory, so the
    prediction never grows with it.
    """

    io: Line
    cpu: Line
    threads: float
    ratios: tuple[float, ...]
    efficiency: tuple[tuple[float, float], ...] = ()

    def effective(self, speed: float) -> float:
        """The speed a task runs at, given its nominal ``speed``."""
        points = self.efficiency
        if not points or speed >= self.threads - 1e-9:
            return speed
        if speed <= points[0][0]:
            factor = points[0][1]
        elif speed >= points[-1][0]:
            factor = points[-1][1] + (1 - points[-1][1]) * (speed - points[-1][0]) / max(
                self.threads - points[-1][0], 1e-9
            )
        else:
            factor = points[-1][1]
            for (s0, e0), (s1, e1) in zip(points, points[1:], strict=False):
                if speed <= s1:
                    factor = e0 + (e1 - e0) * (speed - s0) / (s1 - s0)
                    break
        return speed * min(1.0, factor)

    def time(self, input_bytes: float, speed: float) -> float:
        return self.io.at(input_bytes) + self.cpu.at(input_bytes) / max(self.effective(speed), 1e-9)


def exec_model(samples: Sequence[tuple[int, Sequence[float]]], cpu: CpuModel) -> ExecModel:
    """Fit ``ExecModel`` to ``(memory MB, sample)`` pairs of every size.

    A sample is ``[input_bytes, output_bytes, wall_s, cpu_s, peak_mb, wait_s]``
    (``wait_s``: runnable but waiting for a CPU — throttling, contention); shorter ones
    come from sources that measure less: without ``wait_s`` the wall time beyond the CPU
    time at the share's speed counts as waiting, without ``cpu_s`` the task counts as
    CPU-bound. CPU time does not depend on the share, and neither does the time the task
    itself waited (I/O, sleep), so every size's samples are pooled.
    """
    # Samples come from a few sizes: each size's share and speed is worked out once.
    sizes = {m for m, _ in samples}
    multicore = {m for m in sizes if cpu.share(m) > 1}
    parallel = [s[3] / s[2] for m, s in samples if m in multicore and len(s) > 3 and s[2] > 0]
    threads = max(cpu.task_threads, max(parallel, default=0.0))
    speeds = {m: cpu.speed(m, threads) for m in sizes}
    xs, work, io = [], [], []
    rates: dict[float, list[float]] = {}
    for memory, sample in samples:
        speed = speeds[memory]
        wall = float(sample[2])
        used = float(sample[3]) if len(sample) > 3 else wall * speed
        xs.append(float(sample[0]))
        if len(sample) > 5:
            delayed = float(sample[5])
            work.append(used)
            io.append(max(0.0, wall - used - delayed))
            if used > 0.001 and speed < threads - 1e-9:
                rate = used / (used + delayed) if used + delayed > 0 else speed
                rates.setdefault(round(speed, 6), []).append(min(1.0, rate / speed))
        else:
            used = min(used, wall * speed)
            work.append(used)
            io.append(max(0.0, wall - used / speed))
    # The least contended sample at each share tells its efficiency best.
    efficiency = tuple(sorted((speed, max(values)) for speed, values in rates.items()))
    model = ExecModel(robust_line(xs, io), robust_line(xs, work), threads, (), efficiency)
    # A function's tasks mostly see a few input sizes: one prediction per size and input.
    predictions: dict[tuple[int, float], float] = {}
    ratios = []
    for (memory, sample), x in zip(samples, xs, strict=True):
        predicted = predictions.get((memory, x))
        if predicted is None:
            predicted = predictions[memory, x] = model.time(x, speeds[memory])
        if predicted > 0:
            ratios.append(float(sample[2]) / predicted)
    return ExecModel(model.io, model.cpu, threads, tuple(ratios), efficiency)


@dataclass(frozen=True)
class Startup:
    """Mean cold and warm start-up until an invocation's first task begins, and
    ``boot_s``: the quickest boot seen — the boot's own work, which instances booting at
    once on one machine share. ``setup_cpu_s`` of ``cold_s`` (``warm_setup_cpu_s`` of
    ``warm_s``) is the setup's CPU work at one full vCPU, done at ``setup_speed``: on a
    machine whose other load leaves fewer CPUs than that, the platform model stretches it
    (``Platform.loaded``)."""

    cold_s: float
    warm_s: float
    boot_s: float = 0.0
    setup_cpu_s: float = 0.0
    warm_setup_cpu_s: float = 0.0
    setup_speed: float = 1.0


class Predictor:
    """Predictions for one plan, from one history snapshot, under one SLA."""

    def __init__(self, history: History, sla: SLA, cpu: CpuModel | None = None) -> None:
        self.history = history
        self.sla = sla
        self.cpu = cpu or CpuModel()
        by_function: dict[str, list[tuple[int, Sequence[float]]]] = {}
        for (function, memory), samples in history.tasks.items():
            by_function.setdefault(function, []).extend((memory, s) for s in samples)
        self._models = {f: exec_model(pairs, self.cpu) for f, pairs in by_function.items()}
        self._largest: dict[str, tuple[float, float]] = {}
        self._outputs: dict[str, Line] = {}
        self._peaks: dict[str, Line] = {}
        for function, pairs in by_function.items():
            pooled = [s for _m, s in pairs]
            self._largest[function] = (max(s[0] for s in pooled), max(s[1] for s in pooled))
            self._outputs[function] = fit_line([s[0] for s in pooled], [s[1] for s in pooled])
            peaks = [(s[0], s[4]) for s in pooled if len(s) > 4 and s[4] > 0]
            if peaks:
                line = fit_line([x for x, _ in peaks], [p for _, p in peaks])
                # Upper envelope: the line raised to the highest peak it fell short of.
                at = {x: line.at(x) for x in {x for x, _ in peaks}}
                worst = max(p - at[x] for x, p in peaks)
                self._peaks[function] = Line(line.intercept + max(0.0, worst), line.slope)
        # A function seen with one input size is predicted by the medians of its newest
        # samples, which are the tasks its residuals measured: scaling by them as well
        # would count the drift from one run to the next twice (a run whose tasks took
        # 30 % more CPU moves the medians there, and its residuals by 30 % more again).
        varied = {f for f, pairs in by_function.items() if len({s[0] for _m, s in pairs}) > 1}
        self._bias = {
            function: min(max(median(values), BIAS_RANGE[0]), BIAS_RANGE[1])
            for function, values in history.residuals.items()
            if len(values) >= CALIBRATION_SAMPLES and function in varied
        }
        self._too_small = {
            function: max(sizes) for function, sizes in history.out_of_memory.items() if sizes
        }
        self._exec_cache: dict[tuple[str, int], tuple[Line, Line, float]] = {}
        self._transfers = {m: transfer_line(ss) for m, ss in history.transfers.items()}
        self._pooled_transfer = transfer_line([s for ss in history.transfers.values() for s in ss])
        # One boot for every size: an instance boots the same code whatever its size
        # (measured boots do not depend on it), and per-size figures would let noise pick
        # sizes. Its setup is one thread's CPU work under the instance's quota: measured
        # at the sizes it ran at, it is scaled to the others by their speed.
        self._boot, self._setup_work = _startup_of(history.startups, self.cpu)
        self._startups: dict[int, Startup] = {}

    # -- execution -----------------------------------------------------------------------

    def knows(self, function: str) -> bool:
        return function in self._models

    def model(self, function: str) -> ExecModel | None:
        return self._models.get(function)

    def bias(self, function: str) -> float:
        """The calibration factor of ``function`` on this platform (1.0 until known)."""
        return self._bias.get(function, 1.0)

    def exec_time(self, function: str, input_bytes: float, memory_mb: int) -> float:
        """Predicted mean execution seconds; 0.0 for a function without history."""
        model = self._models.get(function)
        if model is None:
            return 0.0
        speed = self.cpu.speed(memory_mb, model.threads)
        return model.time(input_bytes, speed) * self.bias(function)

    def exec_parts(self, function: str, input_bytes: float) -> tuple[float, float]:
        """``(io_s, cpu_s at speed 1)``: the parts the platform model runs."""
        model = self._models.get(function)
        if model is None:
            return 0.0, 0.0
        bias = self.bias(function)
        return model.io.at(input_bytes) * bias, model.cpu.at(input_bytes) * bias

    def ratios(self, function: str) -> tuple[float, ...]:
        """Measured / predicted time of the samples of ``function``, centred on 1 (their
        median: the bias is the calibration's); empty if unknown."""
        model = self._models.get(function)
        if model is None or not model.ratios:
            return ()
        centre = median(model.ratios)
        return tuple(r / centre for r in model.ratios) if centre > 0 else model.ratios

    def speed(self, function: str, memory_mb: float) -> float:
        """The speed ``function`` computes at in ``memory_mb`` (1: one full vCPU)."""
        model = self._models.get(function)
        if model is None:
            return self.cpu.speed(memory_mb)
        return model.effective(self.cpu.speed(memory_mb, model.threads))

    def work_bound_s(self, function: str, memory_mb: int) -> float | None:
        """Execution seconds at the largest input ``function`` was seen with; None if unknown."""
        if function not in self._largest:
            return None
        return self.exec_time(function, self._largest[function][0], memory_mb)

    # -- data and memory -----------------------------------------------------------------

    def output_bytes(self, function: str, input_bytes: float) -> float:
        line = self._outputs.get(function)
        return 0.0 if line is None else line.at(input_bytes)

    def transfer_time(self, nbytes: float, memory_mb: int) -> float:
        """Seconds to read or write ``nbytes`` from a worker of ``memory_mb``."""
        return self._transfers.get(memory_mb, self._pooled_transfer).at(nbytes)

    def memory_need_mb(self, function: str, input_bytes: float, output_bytes: float) -> float:
        """Memory a task needs: its measured peak with headroom, else a data estimate.

        Never at or below a size ``function`` ran out of memory at.
        """
        peak = self._peaks.get(function)
        if peak is not None:
            need = MEMORY_HEADROOM * peak.at(input_bytes)
        else:
            need = RUNTIME_MB + DATA_MEMORY_FACTOR * (input_bytes + output_bytes) / 2**20
        too_small = self._too_small.get(function)
        if too_small is not None:
            need = max(need, too_small + 1)
        return need

    def need_bound_mb(self, function: str) -> float:
        """Memory ``function`` needs at the largest input and output it was seen with."""
        largest_input, largest_output = self._largest.get(function, (0.0, 0.0))
        return self.memory_need_mb(function, largest_input, largest_output)

    # -- start-up ------------------------------------------------------------------------

    def startup(self, memory_mb: int) -> Startup:
        """Cold and warm start-up at ``memory_mb``: the boot measured at every size
        together, the setup's work at the speed of one thread at ``memory_mb``."""
        startup = self._startups.get(memory_mb)
        if startup is None:
            speed = self.cpu.speed(memory_mb, threads=1.0)
            cold_work, warm_work = self._setup_work
            startup = Startup(
                self._boot.cold_s + cold_work / speed,
                self._boot.warm_s + warm_work / speed,
                self._boot.boot_s,
                cold_work,
                warm_work,
                speed,
            )
            self._startups[memory_mb] = startup
        return startup


def _startup_of(
    samples: Mapping[int, Sequence[Sequence[float]]], cpu: CpuModel
) -> tuple[Startup, tuple[float, float]]:
    """The boot, and the setup's cold and warm work (seconds at one full vCPU), from
    ``[cold, seconds, setup_s, cpus]`` samples per size (``setup_s``, from the handler's
    start to its first task — loading the run record, a fresh instance's first imports —
    may be missing in older ones; ``cpus``, the CPUs the sample's run got on a busy
    machine, where measured). A start-up runs until the first task: the boot or hand-over
    (``cold_s``, ``warm_s``) plus the setup; ``boot_s`` is the boot's own work alone.

    The setup ran at its size's speed, or slower where the machine's other load left the
    run fewer CPUs than that: a setup measured at 1769 MB on a third of a free CPU did a
    third of its time in work, and a 512 MB instance on that machine sets up hardly
    slower (both are held by the machine, not by their quotas)."""
    everything = [s for ss in samples.values() for s in ss]
    cold = [s[1] for s in everything if s[0]]
    warm = [s[1] for s in everything if not s[0]]
    cold_s = mean(cold) if cold else DEFAULT_COLD_START_S
    warm_s = mean(warm) if warm else DEFAULT_WARM_START_S
    boot_s = min(cold) if cold else cold_s
    cold_work: list[float] = []
    warm_work: list[float] = []
    for memory_mb, sized in samples.items():
        speed = cpu.speed(memory_mb, threads=1.0)
        for sample in sized:
            if len(sample) > 2:
                rate = min(speed, sample[3]) if len(sample) > 3 else speed
                (cold_work if sample[0] else warm_work).append(sample[2] * rate)
    # The median: a fresh platform's first instances import what later ones find loaded.
    setup_work = (
        median(cold_work) if cold_work else 0.0,
        median(warm_work) if warm_work else 0.0,
    )
    return Startup(cold_s, warm_s, boot_s), setup_work
