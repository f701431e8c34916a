"""dask.array, dask.bag and dask.dataframe on serverless workers."""

from __future__ import annotations

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd


def test_array_matmul_and_reductions(scheduler):
    x = da.random.default_rng(42).random((600, 400), chunks=(150, 100))
    product = x @ x.T
    computations = (product.sum(), x.mean(axis=0), x.std(), product[:5, :5])
    ours = dask.compute(*computations, scheduler=scheduler)
    theirs = dask.compute(*computations, scheduler="threads")
    for mine, expected in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(mine, expected)


def test_bag_word_count(scheduler):
    lines = [f"the quick brown fox {i % 7} jumps over the lazy dog {i % 3}" for i in range(2000)]
    counts = db.from_sequence(lines, npartitions=20).str.split().flatten().frequencies()
    ours = dict(counts.compute(scheduler=scheduler))
    assert ours == dict(counts.compute(scheduler="threads"))
    assert ours["the"] == 4000


def test_dataframe_groupby_and_merge(scheduler):
    rng = np.random.default_rng(0)
    left = pd.DataFrame({"k": rng.integers(0, 20, 3000), "v": rng.random(3000)})
    right = pd.DataFrame({"k": np.arange(20), "label": [f"l{i}" for i in range(20)]})
    ddf = dd.from_pandas(left, npartitions=6)
    grouped = ddf.groupby("k").v.agg(["sum", "count", "mean"])
    merged = ddf.merge(dd.from_pandas(right, npartitions=2), on="k").groupby("label").v.sum()
    ours = dask.compute(grouped, merged, scheduler=scheduler)
    theirs = dask.compute(grouped, merged, scheduler="threads")
    pd.testing.assert_frame_equal(ours[0].sort_index(), theirs[0].sort_index())
    pd.testing.assert_series_equal(ours[1].sort_index(), theirs[1].sort_index())
