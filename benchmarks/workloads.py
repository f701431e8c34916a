"""Benchmark workloads: ordinary Dask code, built lazily.

Every workload is a function ``build(quick) -> tuple of collections`` that a user could have
written. Nothing is computed here; the runner hands the collections to each scheduler. All
task functions live at module level so every scheduler (including process-based ones)
pickles them by reference.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import dask.bag as db
import dask.dataframe as dd
import numpy as np
import pandas as pd
from dask.delayed import Delayed

Collections = tuple[Any, ...]

VOCABULARY: tuple[str, ...] = tuple(
    f"{syllable}{suffix}"
    for syllable in ("da", "sk", "ar", "ray", "bag", "frame", "graph", "task", "node", "key")
    for suffix in ("", "s", "ed", "er", "ing", "ly", "ion", "ness", "able", "ful")
)


@dataclass(frozen=True)
class Workload:
    """A named benchmark graph.

    ``per_task`` marks graphs whose tasks do (almost) nothing, so median / tasks is a
    meaningful scheduler overhead per task. ``io_bound`` marks graphs whose tasks mostly
    wait: dask-serverless runs them with more concurrent instances than cores, the setting
    a user chooses for such graphs. ``sequential`` marks workloads that are many computes:
    each collection is computed on its own, one after the other, as a user at a notebook
    runs cell after cell. ``quick_note`` says how ``--quick`` scales the graph down (empty
    when it does not).
    """

    name: str
    build: Callable[[bool], Collections]
    per_task: bool = False
    io_bound: bool = False
    sequential: bool = False
    quick_note: str = ""
    # (peer scheduler, ratio): the workload's time on dask-serverless must stay at most
    # this many times the peer's; the runner reports whether it does.
    target: tuple[str, float] | None = None
    # (peer scheduler, ratio): the same for the client's peak RSS during one compute. The
    # runner measures it only for workloads that have one, each scheduler in a fresh
    # process of its own (``benchmarks.peak_rss``).
    memory_target: tuple[str, float] | None = None


# --- small task functions -------------------------------------------------------------


def noop(i: int) -> int:
    """Return the input: a task whose cost is only the scheduler's."""
    return i


def add(a: Any, b: Any) -> Any:
    """Combine two partial results."""
    return a + b


def inc(x: int) -> int:
    """Add one: the smallest possible dependent step."""
    return x + 1


def sleep_leaf(i: int, seconds: float) -> int:
    """Sleep like an I/O-bound task, then return the input."""
    time.sleep(seconds)
    return i


def sleep_step(previous: Any, seconds: float) -> float:
    """Sleep a fixed time after the previous step finished (a fixed-duration task)."""
    time.sleep(seconds)
    return seconds if previous is None else float(previous) + seconds


def collect(*values: Any) -> list[Any]:
    """Sink that gathers all its inputs."""
    return list(values)


def tree_reduce(items: Sequence[Any], combine: Callable[[Any, Any], Any]) -> Any:
    """Reduce ``items`` pairwise, level by level, into one binary tree of ``combine``."""
    level = list(items)
    while len(level) > 1:
        paired = [combine(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def delayed_add(a: Any, b: Any) -> Delayed:
    """One ``dask.delayed`` addition node (a combine step for :func:`tree_reduce`)."""
    return dask.delayed(add)(a, b)


# --- scheduler-overhead workloads -----------------------------------------------------


def noop_tree(quick: bool) -> Collections:
    """No-op leaves summed by a binary tree: pure scheduler overhead (~2 tasks per leaf)."""
    n_leaves = 1_000 if quick else 5_000
    leaves = [dask.delayed(noop)(i) for i in range(n_leaves)]
    return (tree_reduce(leaves, delayed_add),)


DELAYED_200K_LEAVES = 100_000


def delayed_200k(quick: bool) -> Collections:
    """A large map-reduce of small ``dask.delayed`` calls, as a user writes one: 100 000
    mapped items summed by a binary tree, ~200 000 tasks. The same size with ``--quick``:
    its point is the client's time and memory per task at that size."""
    mapped = [dask.delayed(inc)(i) for i in range(DELAYED_200K_LEAVES)]
    return (tree_reduce(mapped, delayed_add),)


def chain(quick: bool) -> Collections:
    """Tiny tasks, each depending on the previous one: latency per dependent step."""
    value: Any = 0
    for _ in range(250 if quick else 1_000):
        value = dask.delayed(inc)(value)
    return (value,)


def sleep_tree(quick: bool) -> Collections:
    """Leaves that sleep 10 ms each, tree-reduced: how well the scheduler overlaps waiting."""
    n_leaves = 128 if quick else 1_024
    leaves = [dask.delayed(sleep_leaf)(i, 0.01) for i in range(n_leaves)]
    return (tree_reduce(leaves, delayed_add),)


# --- dask.array ------------------------------------------------------------------------


def gemm(quick: bool) -> Collections:
    """Matrix product of a random matrix with its transpose, summed (BLAS-heavy blocks)."""
    n = 2_000 if quick else 4_000
    x = da.random.default_rng(0).random((n, n), chunks=500)
    return ((x @ x.T).sum(),)


def tall_skinny(quick: bool) -> da.Array:
    """A seeded tall-and-skinny random matrix, the shape TSQR and SVD are built for."""
    rows = 50_000 if quick else 200_000
    return da.random.default_rng(1).random((rows, 100), chunks=(10_000, 100))


def tsqr(quick: bool) -> Collections:
    """R factor of a tall-skinny QR decomposition (a reduction tree of small QRs)."""
    _q, r = da.linalg.tsqr(tall_skinny(quick))
    return (r,)


def svd(quick: bool) -> Collections:
    """Singular values of a tall-skinny matrix (TSQR followed by a small SVD)."""
    _u, s, _v = da.linalg.svd(tall_skinny(quick))
    return (s,)


# --- dask.bag --------------------------------------------------------------------------


def make_text(seeds: list[int], lines: int = 500, words_per_line: int = 12) -> list[str]:
    """Generate deterministic lines of text (skewed word frequencies) for each seed."""
    weights = [1.0 / (rank + 1) for rank in range(len(VOCABULARY))]
    text = []
    for seed in seeds:
        rng = random.Random(seed)
        for _ in range(lines):
            text.append(" ".join(rng.choices(VOCABULARY, weights, k=words_per_line)))
    return text


def count_of(pair: tuple[str, int]) -> int:
    """Sort key of a ``(word, count)`` pair."""
    return pair[1]


def wordcount(quick: bool) -> Collections:
    """The ten most frequent words in 200 partitions of generated text."""
    lines = 200 if quick else 500
    text = db.from_sequence(range(200), npartitions=200).map_partitions(make_text, lines)
    top = text.str.split().flatten().frequencies().topk(10, key=count_of)
    return (top,)


# --- dask.dataframe --------------------------------------------------------------------


def make_events(partition: int, rows: int) -> pd.DataFrame:
    """One partition of synthetic events: user id, category and two measurements."""
    rng = np.random.default_rng(partition)
    return pd.DataFrame(
        {
            "user": rng.integers(0, 10_000, rows),
            "category": rng.choice(np.array(["a", "b", "c", "d", "e"]), rows),
            "amount": rng.random(rows) * 100.0,
            "quantity": rng.integers(1, 10, rows),
        }
    )


def make_users(partition: int, rows: int) -> pd.DataFrame:
    """One partition of a synthetic user table keyed by ``user``."""
    rng = np.random.default_rng(10_000 + partition)
    start = partition * rows
    return pd.DataFrame(
        {
            "user": np.arange(start, start + rows),
            "country": rng.choice(np.array(["de", "fr", "us", "jp"]), rows),
        }
    )


def groupby(quick: bool) -> Collections:
    """Aggregate events per category, and revenue per country after joining users."""
    rows = 20_000 if quick else 200_000
    events = dd.from_map(make_events, range(20), args=(rows,))
    users = dd.from_map(make_users, range(4), args=(2_500,))
    per_category = events.groupby("category").agg({"amount": "mean", "quantity": "sum"})
    joined = events.merge(users, on="user", shuffle_method="tasks")
    per_country = joined.groupby("country").amount.sum()
    return (per_category, per_country)


# --- the origin system's workflows, as Dask code ---------------------------------------


def fixed_times(quick: bool) -> Collections:
    """Chains of 5, 4, 3, 2 and 1 fixed-duration tasks joined by one sink."""
    seconds = 0.05 if quick else 0.5
    ends = []
    for length in (5, 4, 3, 2, 1):
        value: Any = None
        for _ in range(length):
            value = dask.delayed(sleep_step)(value, seconds)
        ends.append(value)
    return (dask.delayed(collect)(*ends),)


def make_numbers(seed: int) -> np.ndarray:
    """A small seeded vector."""
    return np.random.default_rng(seed).random(10_000)


def concatenate(*arrays: np.ndarray) -> np.ndarray:
    """Fan-in: join all inputs into one vector."""
    return np.concatenate(arrays)


def scale(values: np.ndarray, factor: int) -> np.ndarray:
    """Fan-out step: an elementwise transform of the shared input."""
    return np.sqrt(values) * factor


def summarize(values: np.ndarray) -> dict[str, float]:
    """Final statistics of the whole computation."""
    return {"mean": float(values.mean()), "std": float(values.std()), "n": float(values.size)}


def fanout_fanin_graph(first_seed: int) -> Delayed:
    """3 → 1 → 3 → 1 → 1 small compute tasks on the seeds from ``first_seed`` on."""
    sources = [dask.delayed(make_numbers)(seed) for seed in range(first_seed, first_seed + 3)]
    joined = dask.delayed(concatenate)(*sources)
    scaled = [dask.delayed(scale)(joined, factor) for factor in (1, 2, 3)]
    rejoined = dask.delayed(concatenate)(*scaled)
    return dask.delayed(summarize)(rejoined)


def fanout_fanin(quick: bool) -> Collections:
    """3 → 1 → 3 → 1 → 1 small compute tasks."""
    return (fanout_fanin_graph(0),)


INTERACTIVE_COMPUTES = 100


def interactive(quick: bool) -> Collections:
    """100 small computes one after the other, a 9-task graph each (``fanout_fanin``'s
    shape on other seeds every time), as a user at a notebook computes: the fixed cost
    of a run, paid 100 times."""
    return tuple(fanout_fanin_graph(3 * number) for number in range(INTERACTIVE_COMPUTES))


def count_words(document: int) -> Counter[str]:
    """Generate one document deterministically and count its words."""
    return Counter(" ".join(make_text([document], lines=200)).split())


def merge_counts(a: Counter[str], b: Counter[str]) -> Counter[str]:
    """Pairwise merge of word counts."""
    return a + b


def delayed_merge_counts(a: Any, b: Any) -> Delayed:
    """One ``dask.delayed`` merge node (a combine step for :func:`tree_reduce`)."""
    return dask.delayed(merge_counts)(a, b)


def analyze(counts: Counter[str]) -> dict[str, Any]:
    """Summary of one word count: size, vocabulary and most common words."""
    return {
        "words": sum(counts.values()),
        "distinct": len(counts),
        "top": counts.most_common(5),
    }


def report(overall: dict[str, Any], *segments: dict[str, Any]) -> dict[str, Any]:
    """Final report joining the overall analysis with every segment's."""
    return {"overall": overall, "segments": list(segments)}


def text_analysis(quick: bool) -> Collections:
    """32 word counts → pairwise merges into 4 segments → segment and overall analyses."""
    level = [dask.delayed(count_words)(document) for document in range(32)]
    while len(level) > 4:
        level = [
            dask.delayed(merge_counts)(a, b) for a, b in zip(level[::2], level[1::2], strict=True)
        ]
    segment_analyses = [dask.delayed(analyze)(segment) for segment in level]
    total = tree_reduce(level, delayed_merge_counts)
    overall = dask.delayed(analyze)(total)
    return (dask.delayed(report)(overall, *segment_analyses),)


def make_image(size: int, seed: int) -> np.ndarray:
    """A seeded grey-scale test image."""
    return np.random.default_rng(seed).random((size, size))


def get_tile(image: np.ndarray, index: int, tiles_per_side: int) -> np.ndarray:
    """Cut tile ``index`` (row-major) out of a square image."""
    step = image.shape[0] // tiles_per_side
    row, column = divmod(index, tiles_per_side)
    return image[row * step : (row + 1) * step, column * step : (column + 1) * step].copy()


def blur(tile: np.ndarray) -> np.ndarray:
    """3×3 box blur (edges padded)."""
    padded = np.pad(tile, 1, mode="edge")
    height, width = tile.shape
    shifted = [padded[i : i + height, j : j + width] for i in range(3) for j in range(3)]
    return np.mean(shifted, axis=0)


def sharpen(tile: np.ndarray) -> np.ndarray:
    """Unsharp mask: add back the difference to a blurred copy."""
    return tile + (tile - blur(tile))


def normalize(tile: np.ndarray) -> np.ndarray:
    """Stretch values to [0, 1]."""
    low, high = tile.min(), tile.max()
    return (tile - low) / (high - low) if high > low else np.zeros_like(tile)


def threshold(tile: np.ndarray) -> np.ndarray:
    """Binary mask of the bright half."""
    return tile > 0.5


def histogram(tile: np.ndarray) -> np.ndarray:
    """32-bin histogram of the tile's values."""
    counts, _edges = np.histogram(tile, bins=32, range=(0.0, 1.0))
    return counts


def histogram_stats(counts: np.ndarray) -> dict[str, float]:
    """Statistics of one histogram."""
    return {"peak_bin": float(np.argmax(counts)), "pixels": float(counts.sum())}


def combine_tile(mask: np.ndarray, stats: dict[str, float]) -> dict[str, Any]:
    """Join the two branches of one tile."""
    return {"bright": int(mask.sum()), **stats}


def merge_tiles(*tiles: dict[str, Any]) -> dict[str, Any]:
    """Merge all tile results into one image summary."""
    return {"bright": sum(tile["bright"] for tile in tiles), "tiles": len(tiles)}


def image_pipeline(quick: bool) -> Collections:
    """Split an image into 16 tiles; per tile a 4-step filter chain ∥ a 2-step histogram chain."""
    size = 1_024 if quick else 2_048
    image = dask.delayed(make_image)(size, 0)
    results = []
    for index in range(16):
        tile = dask.delayed(get_tile)(image, index, 4)
        mask = dask.delayed(threshold)(
            dask.delayed(normalize)(dask.delayed(sharpen)(dask.delayed(blur)(tile)))
        )
        stats = dask.delayed(histogram_stats)(dask.delayed(histogram)(tile))
        results.append(dask.delayed(combine_tile)(mask, stats))
    return (dask.delayed(merge_tiles)(*results),)


PERSISTED_SIDE = 4096  # a 4096² float64 array: 128 MiB, in 16 chunks of 8 MiB


def persist_reduce(quick: bool) -> Collections:
    """Reduce an array that was persisted first: the graph is 16 chunks of literal data.

    The persist happens here, outside the clock (with threads, as a user's earlier
    ``persist`` would leave the chunks in memory); what is timed is the reduction of
    in-memory data, which costs little with threads and must cost little here too.
    """
    x = da.random.default_rng(0).random((PERSISTED_SIDE, PERSISTED_SIDE), chunks=1024)
    (persisted,) = dask.persist(x, scheduler="threads")
    return (persisted.sum(),)


WORKLOADS: tuple[Workload, ...] = (
    Workload("noop-tree", noop_tree, per_task=True, quick_note="1 000 leaves instead of 5 000"),
    Workload("chain", chain, per_task=True, quick_note="250 tasks instead of 1 000"),
    Workload("sleep-tree", sleep_tree, io_bound=True, quick_note="128 leaves instead of 1 024"),
    Workload("gemm", gemm, quick_note="2 000² instead of 4 000²"),
    Workload("tsqr", tsqr, quick_note="50 000 × 100 instead of 200 000 × 100"),
    Workload("svd", svd, quick_note="50 000 × 100 instead of 200 000 × 100"),
    Workload("wordcount", wordcount, quick_note="200 lines per partition instead of 500"),
    Workload("groupby", groupby, quick_note="20 000 rows per partition instead of 200 000"),
    Workload("fixed-times", fixed_times, io_bound=True, quick_note="0.05 s tasks instead of 0.5 s"),
    Workload("fanout-fanin", fanout_fanin),
    Workload("interactive", interactive, sequential=True, target=("threads", 3.0)),
    Workload("text-analysis", text_analysis),
    Workload("image-pipeline", image_pipeline, quick_note="1 024² image instead of 2 048²"),
    Workload("persist-reduce", persist_reduce, target=("threads", 2.0)),
    Workload(
        "delayed-200k",
        delayed_200k,
        per_task=True,
        target=("threads", 1.0),
        memory_target=("threads", 1.5),
    ),
)


def workload_names() -> list[str]:
    """Names of all workloads, in run order."""
    return [workload.name for workload in WORKLOADS]


def select_workloads(names: Sequence[str] | None) -> list[Workload]:
    """The workloads named (all when ``names`` is empty), in the canonical order."""
    if not names:
        return list(WORKLOADS)
    unknown = set(names) - set(workload_names())
    if unknown:
        raise ValueError(f"unknown workload(s): {', '.join(sorted(unknown))}")
    return [workload for workload in WORKLOADS if workload.name in names]


def compute(workload: Workload, collections: Collections, scheduler: Any) -> tuple[Any, ...]:
    """The values of ``collections``: one ``dask.compute`` of them all, or one per
    collection, in order, for a ``sequential`` workload."""
    if workload.sequential:
        return tuple(dask.compute(c, scheduler=scheduler)[0] for c in collections)
    return dask.compute(*collections, scheduler=scheduler)


def count_tasks(collections: Collections, sequential: bool = False) -> int:
    """Number of tasks in the graph ``dask.compute`` actually runs (after optimization);
    for a ``sequential`` workload, the tasks of all its computes.

    This mirrors ``dask.compute``: collections → one expression → finalize → optimize.
    """
    from dask._expr import FinalizeCompute

    groups = [[c] for c in collections] if sequential else [list(collections)]
    return sum(
        len(FinalizeCompute(dask.base.collections_to_expr(group)).optimize().__dask_graph__())
        for group in groups
    )
