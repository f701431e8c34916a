"""Translation of every graph form dask hands a get function."""

from __future__ import annotations

from operator import add

import dask
import pytest
from dask._task_spec import Alias, DataNode, List, Task, TaskRef
from dask.highlevelgraph import HighLevelGraph

from dask_serverless.graph import CycleError, translate
from tests.tasks import inc


def test_chain_of_100000_translates_without_recursion():
    dsk = {f"x{i + 1}": (inc, f"x{i}") for i in range(100_000)}
    dsk["x0"] = 0
    dag = translate(dsk, "x100000")
    assert len(dag) == 100_002
    assert dag.roots == [0]
    assert dag.dependencies[dag.sink] == (100_000,)


def test_fan_out_of_10000_translates():
    dsk = {"root": 1, **{("leaf", i): (add, "root", i) for i in range(10_000)}}
    dsk["sum"] = (sum, [("leaf", i) for i in range(10_000)])
    dag = translate(dsk, "sum")
    assert len(dag.dependents[dag.index["root"]]) == 10_000


def test_only_needed_nodes_are_kept():
    dag = translate({"a": 1, "b": (inc, "a"), "c": (inc, "b"), "z": 5}, "b")
    assert set(dag.keys[: dag.sink]) == {"a", "b"}


def test_order_is_topological_and_sink_is_last():
    dag = translate({"a": 1, "b": (inc, "a"), "c": (add, "a", "b")}, ["c", "a"])
    for child, parents in enumerate(dag.dependencies):
        assert all(parent < child for parent in parents)
    assert dag.requested == (dag.index["c"], dag.index["a"])


def test_cycle_raises():
    with pytest.raises(CycleError):
        translate({"a": (inc, "c"), "b": (inc, "a"), "c": (inc, "b")}, "c")


def test_missing_key_raises():
    with pytest.raises(KeyError):
        translate({"a": 1}, [["a"], "b"])


def test_task_spec_nodes_run(scheduler):
    dsk = {
        "data": DataNode("data", 10),
        "t": Task("t", inc, TaskRef("data")),
        "alias": Alias("alias", "t"),
        "nested": Task("nested", sum, List(TaskRef("t"), TaskRef("alias"), 1)),
    }
    assert scheduler(dsk, ["nested", "alias"]) == (23, 11)


def test_high_level_graph_and_expression(scheduler):
    graph = HighLevelGraph(
        {"a": {"x": 1, "y": (inc, "x")}, "b": {"z": (add, (inc, "x"), "y")}},
        {"a": set(), "b": {"a"}},
    )
    assert scheduler(graph, "z") == 4
    value = dask.delayed(inc)(dask.delayed(inc)(1))
    assert scheduler(value.__dask_graph__(), value.key) == 3
