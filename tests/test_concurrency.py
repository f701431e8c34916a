"""Several computes at once, from threads and from separate client processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import dask

from tests.tasks import inc, slow_inc, total


def tree(width: int, offset: int):
    return dask.delayed(total)([dask.delayed(slow_inc)(offset + i) for i in range(width)])


def test_concurrent_computes_from_threads(scheduler):
    def compute(offset: int) -> int:
        return dask.compute(tree(20, offset), scheduler=scheduler)[0]

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(compute, range(0, 600, 100)))
    assert results == [sum(offset + i + 1 for i in range(20)) for offset in range(0, 600, 100)]


def test_concurrent_client_processes_share_one_redis(redis_url):
    script = textwrap.dedent(
        """
        import sys, dask
        from dask_serverless import Scheduler
        from tests.tasks import slow_inc, total
        offset = int(sys.argv[1])
        if __name__ == "__main__":
            with Scheduler(redis=sys.argv[2], concurrency=2, timeout=120) as sched:
                work = dask.delayed(total)([dask.delayed(slow_inc)(offset + i) for i in range(30)])
                print(dask.compute(work, scheduler=sched)[0])
        """
    )
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(offset), redis_url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for offset in (0, 1000, 2000)
    ]
    outputs = [client.communicate(timeout=180) for client in clients]
    for offset, (out, err), client in zip((0, 1000, 2000), outputs, clients, strict=True):
        assert client.returncode == 0, err
        assert int(out.strip()) == sum(offset + i + 1 for i in range(30))


def test_results_of_interleaved_runs_do_not_mix(scheduler):
    values = [dask.delayed(inc)(i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda v: dask.compute(v, scheduler=scheduler)[0], values))
    assert results == list(range(1, 9))
