"""A client process that the kill trials SIGKILL mid-run.

``python -m tests.abandoned_client REDIS_URL SEED RUN_TTL`` prints ``ready`` (and, with
``REDIS_URL`` ``embedded``, the private server's pid and directory) once its Scheduler is
up, then computes a seeded graph of short tasks until it is killed.
"""

from __future__ import annotations

import random
import sys

import dask

from dask_serverless import Scheduler
from tests.tasks import add_all, sleep_inc


def graph(seed: int):
    """A chain, a tree or a fan-out of 0.05–0.2 s tasks, by seed."""
    rng = random.Random(seed)
    seconds = rng.uniform(0.05, 0.2)
    shape = seed % 3
    if shape == 0:
        value = dask.delayed(sleep_inc)(0, seconds)
        for _ in range(20):
            value = dask.delayed(sleep_inc)(value, seconds)
        return value
    leaves = [dask.delayed(sleep_inc)(i, seconds) for i in range(16)]
    if shape == 1:
        while len(leaves) > 1:
            leaves = [dask.delayed(add_all)(*leaves[i : i + 2]) for i in range(0, len(leaves), 2)]
        return leaves[0]
    return dask.delayed(add_all)(*[dask.delayed(sleep_inc)(v, seconds) for v in leaves])


def main() -> None:
    url, seed, ttl = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with Scheduler(
        redis=None if url == "embedded" else url,
        run_ttl=ttl,
        lease_timeout=1,
        concurrency=2,
        timeout=120,
    ) as sched:
        embedded = sched._embedded
        if embedded is not None:
            print("server", embedded.process.pid, embedded.directory, flush=True)
        print("ready", flush=True)
        while True:
            dask.compute(graph(seed), scheduler=sched)


if __name__ == "__main__":
    main()
