"""Large literals leave the run record: a persisted array's chunks, fused or not."""

from __future__ import annotations

import dask
import dask.array as da
from dask._expr import FinalizeCompute

from dask_serverless.constants import LARGE_LITERAL_BYTES
from dask_serverless.graph import translate
from dask_serverless.protocol.record import RunRecord, seal_record, split_large_literals
from dask_serverless.storage.serialize import Signer


def optimized_graph(collection):
    """The graph ``dask.compute`` hands a scheduler: optimized, chunks fused into tasks."""
    expr = FinalizeCompute(dask.base.collections_to_expr([collection])).optimize()
    return expr.__dask_graph__(), expr.__dask_keys__()


def test_persisted_chunks_leave_the_record_and_only_they_do():
    x = da.random.default_rng(0).random((1024, 1024), chunks=512)
    (x,) = dask.persist(x, scheduler="sync")  # 4 chunks of 2 MiB
    graph, keys = optimized_graph(x.sum())
    dag = translate(graph, keys)
    stripped, taken = split_large_literals(dag, LARGE_LITERAL_BYTES)
    assert len(taken) == 4
    signer = Signer(b"k")
    whole = seal_record(signer, RunRecord("r", dag))
    small = seal_record(signer, RunRecord("r", stripped, literals=frozenset(taken)))
    assert len(small) < 64 * 1024 < 8 * 2**20 <= sum(len(signer.dumps(n)) for n in taken.values())
    assert len(whole) > len(small)
    # The node a worker runs is the whole original node, data included.
    for index, node in taken.items():
        assert node is dag.nodes[index]


def test_small_literals_stay_in_the_record():
    dag = translate({"a": 1, "b": (sum, ["a", "a"])}, "b")
    stripped, taken = split_large_literals(dag, LARGE_LITERAL_BYTES)
    assert taken == {} and stripped is dag
