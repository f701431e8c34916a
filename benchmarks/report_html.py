"""The HTML report of a large run: its size and how long a headless Chromium takes to draw it.

    python -m benchmarks.report_html             # a 10 000-task run (100 chains of 100)
    python -m benchmarks.report_html --tasks 2000

Runs the graph on the embedded default, writes ``RunReport.to_html``, then opens the page
in Chromium (Debian's ``chromium`` package) and times navigation until the report's header
and its canvases are on screen. The target: under 5 s for 10 000 tasks.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import dask

import dask_serverless
from benchmarks.workloads import collect, inc
from tests.browser import Chromium

_CHAIN = 100


def chains(tasks: int) -> object:
    ends = []
    for c in range(max(1, tasks // _CHAIN)):
        x = c
        for _ in range(_CHAIN):
            x = dask.delayed(inc, pure=False)(x)
        ends.append(x)
    return dask.delayed(collect, pure=False)(*ends)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, dask_serverless.Scheduler() as sched:
        dask.compute(chains(args.tasks), scheduler=sched)
        report = sched.last_run
        assert report is not None
        started = time.perf_counter()
        path = report.to_html(os.path.join(scratch, "report.html"))
        written_s = time.perf_counter() - started
        browser = Chromium(Path(scratch) / "profile")
        try:
            loads = [
                browser.open(f"file://{path}", expect=f"Run {report.run_id}") for _ in range(3)
            ]
        finally:
            browser.close()
        size = os.path.getsize(path)
    print(f"tasks: {len(report.tasks)}")
    print(f"HTML: {size / 1e6:.2f} MB, written in {written_s:.2f} s")
    shown = ", ".join(f"{s:.2f} s" for s in loads)
    print(f"Chromium load (navigate → header and canvases drawn): {shown}")


if __name__ == "__main__":
    main()
