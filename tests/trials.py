"""Tallies of seeded fault trials: what each trial did, how it ended, how long it took.

A trial set (the Redis pause/restart trials, the killed-client trials) records one
``Trial`` per seed in its ``TrialTally``; the set's closing test prints the table and
checks the counts, and the session's terminal summary prints every table again
(``tests/conftest.py``), so a plain ``python -m pytest`` run shows them too.
"""

from __future__ import annotations

import concurrent.futures
import queue
import statistics
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

RIGHT = "right answer"


@dataclass(frozen=True)
class Trial:
    """One seeded trial: the fault it injected, how it ended, and after how long."""

    seed: int
    fault: str
    # ``RIGHT``, the name of the error the compute raised, or what the trial measured.
    outcome: str
    seconds: float
    detail: str = ""
    # What the trial counted (workers killed, invocations re-invoked, keys left …).
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class TrialTally:
    """The trials of one set, in the order they ran."""

    title: str
    trials: list[Trial] = field(default_factory=list)

    def add(self, trial: Trial) -> None:
        self.trials.append(trial)

    def run(
        self,
        lanes: queue.Queue,
        trial: Callable[[Any, int], tuple[Trial, list[str]]],
        seeds: int,
    ) -> list[str]:
        """Run the trials of seeds ``0 … seeds-1``, as many at once as ``lanes`` holds
        (each takes a lane — its own servers — and gives it back), add them, print the
        table; return the problems the trials found."""

        def in_a_lane(seed: int) -> tuple[Trial, list[str]]:
            lane = lanes.get()
            try:
                return trial(lane, seed)
            finally:
                lanes.put(lane)

        with concurrent.futures.ThreadPoolExecutor(lanes.qsize()) as pool:
            results = list(pool.map(in_a_lane, range(seeds)))
        for row, _ in results:
            self.add(row)
        print(f"\n{self.table()}")
        return [problem for _, found in results for problem in found]

    def outcomes(self) -> Counter[str]:
        return Counter(trial.outcome for trial in self.trials)

    def total(self, count: str) -> int:
        """The sum of one of the trials' counts."""
        return sum(trial.counts.get(count, 0) for trial in self.trials)

    def table(self) -> str:
        """Every trial, then per outcome: how many, and their fastest, median and slowest
        time."""
        lines = [f"{self.title}: {len(self.trials)} trials"]
        lines.append(f"  {'seed':>5}  {'fault':<24} {'outcome':<22} {'s':>6}  detail")
        for trial in sorted(self.trials, key=lambda t: t.seed):
            lines.append(
                f"  {trial.seed:>5}  {trial.fault:<24} {trial.outcome:<22} "
                f"{trial.seconds:>6.1f}  {trial.detail[:70]}"
            )
        lines.append(f"  {'outcome':<31} {'count':>5} {'min s':>7} {'median s':>9} {'max s':>7}")
        for outcome, count in self.outcomes().most_common():
            times = [t.seconds for t in self.trials if t.outcome == outcome]
            lines.append(
                f"  {outcome:<31} {count:>5} {min(times):>7.1f} "
                f"{statistics.median(times):>9.1f} {max(times):>7.1f}"
            )
        names = sorted({name for trial in self.trials for name in trial.counts})
        if names:
            lines.append("  totals: " + ", ".join(f"{name} {self.total(name)}" for name in names))
        return "\n".join(lines)
