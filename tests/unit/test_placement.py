"""Where outputs go and how roots are bundled: pure functions of the DAG; no Redis."""

from __future__ import annotations

from operator import add

from dask_serverless.graph import translate
from dask_serverless.planning.bundling import bundle_roots
from dask_serverless.protocol.placement import output_leaves_worker
from tests.tasks import inc, total


def test_a_chain_keeps_every_output_in_its_worker():
    dag = translate({"a": 1, "b": (inc, "a"), "c": (inc, "b")}, "c")
    assert not output_leaves_worker(dag, dag.index["a"])
    assert not output_leaves_worker(dag, dag.index["b"])


def test_a_fan_out_stores_its_output_unless_clustered():
    dag = translate({"r": 1, "x": (inc, "r"), "y": (inc, "r"), "z": (add, "x", "y")}, "z")
    root = dag.index["r"]
    assert output_leaves_worker(dag, root)
    assert not output_leaves_worker(dag, root, clustered=True)


def test_a_fan_in_child_may_run_anywhere():
    dag = translate({"a": 1, "b": 2, "c": (add, "a", "b")}, "c")
    assert output_leaves_worker(dag, dag.index["a"])
    assert output_leaves_worker(dag, dag.index["a"], clustered=True)


def test_internal_children_of_a_bundle_do_not_count():
    dag = translate({"a": 1, "b": 2, "c": (add, "a", "b")}, "c")
    child = frozenset({dag.index["c"]})
    assert not output_leaves_worker(dag, dag.index["a"], internal=child)


def tree(leaves: int) -> dict:
    """Leaves reduced pairwise: ``leaf-i`` → ``pair-j`` → ``total``."""
    dsk: dict = {f"leaf-{i}": i for i in range(leaves)}
    for j in range(leaves // 2):
        dsk[f"pair-{j}"] = (add, f"leaf-{2 * j}", f"leaf-{2 * j + 1}")
    dsk["total"] = (total, [f"pair-{j}" for j in range(leaves // 2)])
    return dsk


def test_few_roots_get_one_invocation_each():
    dag = translate(tree(8), "total")
    bundling = bundle_roots(dag, bundles=8)
    assert bundling.starts == [[root] for root in dag.roots]
    assert bundling.internal == frozenset()


def test_roots_are_bundled_and_the_fan_ins_inside_a_bundle_are_internal():
    dag = translate(tree(8), "total")
    bundling = bundle_roots(dag, bundles=2)
    assert len(bundling.starts) == 2
    assert sorted(r for group in bundling.starts for r in group) == dag.roots
    internal_keys = {dag.keys[i] for i in bundling.internal}
    # A pair whose two leaves share a bundle is counted in memory; the total is not.
    for index in bundling.internal:
        parents = dag.dependencies[index]
        assert any(set(parents) <= set(group) for group in bundling.starts)
    assert "total" not in internal_keys
    assert internal_keys <= {f"pair-{j}" for j in range(4)}
    assert internal_keys


def test_a_fan_out_child_never_joins_a_bundle():
    dsk = {f"leaf-{i}": i for i in range(6)}
    dsk.update({f"twice-{i}": (inc, f"leaf-{i}") for i in range(6)})
    dsk.update({f"thrice-{i}": (inc, f"leaf-{i}") for i in range(6)})
    dsk["total"] = (total, [f"twice-{i}" for i in range(6)] + [f"thrice-{i}" for i in range(6)])
    dag = translate(dsk, "total")
    bundling = bundle_roots(dag, bundles=2)
    assert bundling.internal == frozenset()
