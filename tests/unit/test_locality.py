"""Data locality: tasks on persisted chunks run in the client when moving the chunks to a
worker would cost more than the tasks themselves."""

from __future__ import annotations

import sys

import dask
import dask.array as da
import numpy as np
from dask._expr import FinalizeCompute

from dask_serverless.constants import LARGE_LITERAL_BYTES
from dask_serverless.graph import translate
from dask_serverless.planning import SLA, Planning
from dask_serverless.planning.bundling import bundle_roots
from dask_serverless.planning.history import History, function_identities
from dask_serverless.planning.locality import place_in_client
from dask_serverless.planning.predict import Predictor
from dask_serverless.protocol.record import literal_bytes, split_large_literals


def optimized_dag(collection):
    expr = FinalizeCompute(dask.base.collections_to_expr([collection])).optimize()
    return translate(expr.__dask_graph__(), expr.__dask_keys__())


def literal_sizes(dag):
    _, taken = split_large_literals(dag, LARGE_LITERAL_BYTES)
    return {i: literal_bytes(node, sys.maxsize) for i, node in taken.items()}


def persisted_sum():
    x = da.random.default_rng(0).random((1024, 1024), chunks=512)
    (x,) = dask.persist(x, scheduler="sync")  # 4 chunks of 2 MiB
    return optimized_dag(x.sum())


def test_chunks_their_cheap_reduction_and_the_sink_go_to_the_client():
    dag = persisted_sum()
    sizes = literal_sizes(dag)
    predictor = Predictor(History(), SLA.parse("p95"))
    placement = place_in_client(dag, sizes, predictor, function_identities(dag))
    # Each chunk is fused into the task that sums it: those are the roots.
    assert set(placement.roots) == set(sizes) and len(sizes) == 4
    # The tree above them reads only what the client holds, and costs next to nothing;
    # so the sink's inputs are all there: the whole run is the client's, no worker needed.
    assert placement.nodes == set(range(len(dag)))
    assert placement.whole_run
    assert placement.bundling(dag, bundle_roots(dag, 64)).starts == []
    assert placement.literal_bytes == sum(sizes.values()) >= 8 * 2**20
    note = placement.note()
    assert f"{dag.sink} tasks run in the client" in note and "8.0 MiB of literal data" in note
    assert "no worker is needed" in note


def double(x):
    return 2 * x


def test_a_costly_task_downstream_and_what_follows_it_go_to_the_workers():
    chunks = {f"chunk-{i}": np.full(2**17, float(i)) for i in range(3)}  # 1 MiB each
    graph = {
        **chunks,
        **{f"part-{i}": (np.sum, f"chunk-{i}") for i in range(3)},
        "total": (sum, [f"part-{i}" for i in range(3)]),
        "costly": (double, "total"),
        "after": (double, "costly"),
    }
    dag = translate(graph, "after")
    functions = function_identities(dag)
    costly = dag.index["costly"]
    history = History(tasks={(functions[costly], 1769): [[8, 8, 5.0, 5.0, 200.0, 0.0]] * 4})
    predictor = Predictor(history, SLA.parse("p95"))
    placement = place_in_client(dag, literal_sizes(dag), predictor, functions)
    placed = {dag.keys[i] for i in placement.nodes}
    assert placed == {*chunks, "part-0", "part-1", "part-2", "total"}
    assert {dag.keys[i] for i in placement.roots} == set(chunks)
    # The sink reads what the workers compute: it stays on the workers.
    assert not placement.whole_run and "no worker" not in placement.note()


def test_a_task_costlier_than_moving_its_chunk_stays_on_the_workers():
    dag = persisted_sum()
    sizes = literal_sizes(dag)
    functions = function_identities(dag)
    # Optimization fused each chunk into the task that sums it: the roots do the work.
    root = next(iter(sizes))
    # History: that function takes 5 s on a 2 MiB chunk, far more than moving the chunk.
    sample = [2 * 2**20, 8, 5.0, 5.0, 200.0, 0.0]
    history = History(tasks={(functions[root], 1769): [sample] * 4})
    predictor = Predictor(history, SLA.parse("p95"))
    placement = place_in_client(dag, sizes, predictor, functions)
    assert not placement
    assert placement.bundling(dag, bundle_roots(dag, 64)) == bundle_roots(dag, 64)


def test_the_workers_bundles_lose_the_placed_roots_and_what_was_internal_through_them():
    x = da.random.default_rng(0).random((2048, 512), chunks=(256, 512))
    (x,) = dask.persist(x, scheduler="sync")  # 8 chunks of 1 MiB
    y = da.ones((2048, 512), chunks=(256, 512))  # computed by the workers
    dag = optimized_dag(x.sum() + y.sum())
    sizes = literal_sizes(dag)
    predictor = Predictor(History(), SLA.parse("p95"))
    placement = place_in_client(dag, sizes, predictor, function_identities(dag))
    assert set(placement.roots) == set(sizes)
    bundling = bundle_roots(dag, 2)  # few bundles: roots and their reductions bundled
    assert bundling.internal
    moved = placement.bundling(dag, bundling)
    starts = [root for group in moved.starts for root in group]
    assert not set(starts) & placement.nodes
    assert sorted(starts + list(placement.roots)) == sorted(dag.roots)
    assert placement.consumers <= moved.internal
    for index in moved.internal - placement.consumers:
        parents = dag.dependencies[index]
        assert not set(parents) & placement.nodes


def test_the_planner_plans_the_workers_part_and_notes_the_placement():
    dag = persisted_sum()
    planning = Planning(None)
    plan = planning.plan(dag, literal_sizes=literal_sizes(dag))
    assert plan.inputs.placement.nodes
    assert any("run in the client" in note for note in plan.notes)
    unplaced = planning.plan(dag)
    assert not unplaced.inputs.placement
    assert not any("run in the client" in note for note in unplaced.notes)
