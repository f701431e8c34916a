"""dask.delayed graphs give exactly what dask's threaded scheduler gives."""

from __future__ import annotations

import os
from operator import add

import dask
import dask.threaded

from tests.tasks import inc, slow_inc, total


def both(scheduler, *collections):
    ours = dask.compute(*collections, scheduler=scheduler)
    theirs = dask.compute(*collections, scheduler="threads")
    return ours, theirs


def test_diamond(scheduler):
    a = dask.delayed(inc)(1)
    b = dask.delayed(inc)(a)
    c = dask.delayed(add)(a, 10)
    d = dask.delayed(add)(b, c)
    ours, theirs = both(scheduler, d)
    assert ours == theirs == (15,)


def test_fan_out_of_1000_then_fan_in(scheduler):
    root = dask.delayed(inc)(0)
    leaves = [dask.delayed(add)(root, i) for i in range(1000)]
    ours, theirs = both(scheduler, dask.delayed(total)(leaves))
    assert ours == theirs == (sum(1 + i for i in range(1000)),)


def test_fan_in_of_many_roots(scheduler):
    leaves = [dask.delayed(slow_inc)(i) for i in range(50)]
    ours, theirs = both(scheduler, dask.delayed(total)(leaves))
    assert ours == theirs


def test_chain_of_20000(scheduler):
    dsk = {f"x{i + 1}": (inc, f"x{i}") for i in range(20_000)}
    dsk["x0"] = 0
    assert scheduler(dsk, "x20000") == 20_000


def test_several_outputs_and_nested_keys(scheduler):
    dsk = {"a": 1, "b": (inc, "a"), "c": (add, "a", "b"), "d": (inc, "c")}
    keys = [["d", ["a", "c"]], "b", "d"]
    assert scheduler(dsk, keys) == dask.threaded.get(dsk, keys) == ((4, (1, 3)), 2, 4)


def test_several_collections_and_python_structures(scheduler):
    x = dask.delayed(inc)(1)
    y = dask.delayed(add)(x, 5)
    ours, theirs = both(scheduler, {"x": x, "y": [y, 3]}, x)
    assert ours == theirs == ({"x": 2, "y": [7, 3]}, 2)


def test_tasks_run_in_workers_not_in_the_client(scheduler):
    pids = dask.compute([dask.delayed(os.getpid)() for _ in range(4)], scheduler=scheduler)[0]
    assert os.getpid() not in pids


def test_only_the_needed_part_of_the_graph_runs(scheduler):
    dsk = {"a": 1, "b": (inc, "a"), "never": (os.abort,)}
    assert scheduler(dsk, "b") == 2


def test_literal_and_alias_requests(scheduler):
    dsk = {"a": [1, 2, 3], "b": "a", "c": (sum, "b")}
    assert scheduler(dsk, ["a", "b", "c"]) == ([1, 2, 3], [1, 2, 3], 6)
