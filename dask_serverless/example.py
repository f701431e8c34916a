"""A small real computation on the embedded default: ``python -m dask_serverless.example``.

A dask.array matrix product, a dask.bag word count and a dask.delayed tree reduction, each
checked against dask's threaded scheduler.
"""

from __future__ import annotations

import time
from typing import Any

import dask
import dask.array as da
import dask.bag as db
import numpy as np

import dask_serverless


def add(x: int, y: int) -> int:
    return x + y


def tree_sum(values: list) -> Any:
    """Reduce delayed values pairwise, the way a user writes a tree reduction."""
    while len(values) > 1:
        values = [
            dask.delayed(add)(values[i], values[i + 1]) if i + 1 < len(values) else values[i]
            for i in range(0, len(values), 2)
        ]
    return values[0]


def main() -> None:
    x = da.random.default_rng(0).random((2000, 2000), chunks=500)
    words = db.from_sequence(
        [f"serverless dask {i % 5} runs dask graphs" for i in range(10_000)], npartitions=16
    )
    counts = words.str.split().flatten().frequencies(sort=True)
    tree = tree_sum([dask.delayed(add)(i, 1) for i in range(1000)])
    work = ((x @ x.T).sum(), counts, tree)

    started = time.perf_counter()
    ours = dask.compute(*work, scheduler=dask_serverless.get)
    elapsed = time.perf_counter() - started
    theirs = dask.compute(*work, scheduler="threads")

    assert np.isclose(ours[0], theirs[0]) and ours[1] == theirs[1] and ours[2] == theirs[2]
    print(f"sum(x @ x.T)           = {ours[0]:.6e}")
    print(f"most frequent words    = {ours[1][:3]}")
    print(f"tree sum of 1..1000    = {ours[2]}")
    print(f"computed on serverless workers in {elapsed:.2f} s; same as dask's threaded scheduler")


if __name__ == "__main__":
    main()
