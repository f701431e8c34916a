"""Task functions the tests use; an importable module, so workers unpickle them by name."""

from __future__ import annotations

import time


def inc(x):
    return x + 1


def slow_inc(x, delay=0.01):
    time.sleep(delay)
    return x + 1


def total(values):
    return sum(values)


def fail(x):
    raise ValueError(f"task failed on {x}")


def sleep_then(x, seconds):
    time.sleep(seconds)
    return x


class Unpicklable(Exception):
    """An exception that carries something pickle refuses."""

    def __init__(self, message):
        super().__init__(message)
        self.handle = lambda: None

    def __reduce__(self):
        raise TypeError("cannot pickle this exception")


def raise_unpicklable(x):
    raise Unpicklable(f"unpicklable on {x}")
