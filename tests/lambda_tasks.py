"""Task functions for the AWS Lambda tests; importable, so workers unpickle them by name."""

from __future__ import annotations


def add(x, y):
    return x + y


def inc(x):
    return x + 1


def payload(size, seed):
    """``size`` bytes: an output over the large-output threshold."""
    return bytes([seed % 256]) * size


def total_length(parts):
    return sum(len(part) for part in parts)


def note_then_hold_the_gil(path, x, seconds):
    """Append a line to ``path`` (one per run of the task), then sleep ``seconds`` in C
    holding the GIL (``PyDLL`` does not release it); return ``x``."""
    import ctypes

    with open(path, "a") as notes:
        notes.write("ran\n")
    ctypes.PyDLL(None).sleep(int(seconds))
    return x
