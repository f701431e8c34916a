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


def fail_first(x, counter_path, failures):
    """Raise on the first ``failures`` calls (counted in a file), then return ``x``."""
    with open(counter_path, "a+") as counter:
        counter.seek(0)
        calls = len(counter.read())
        counter.write("x")
    if calls < failures:
        raise ConnectionResetError(f"flaky call {calls + 1}")
    return x


def sleep_inc(x, seconds=0.05):
    time.sleep(seconds)
    return x + 1


def add_all(*values):
    return sum(values)


def big_bytes(size):
    return b"x" * size


def log_and_sleep(x, log_path, seconds):
    with open(log_path, "a") as log:
        log.write(f"{x}\n")
    time.sleep(seconds)
    return x


def pid_with(value, seconds=0.0):
    """This worker's process id, after waiting (so parallel instances get used)."""
    import os

    time.sleep(seconds)
    return os.getpid()


def raise_base(kind):
    """Raise a ``BaseException`` that is not an ``Exception``."""
    if kind == "exit":
        raise SystemExit(3)
    if kind == "interrupt":
        raise KeyboardInterrupt("from a task")
    raise GeneratorExit("a bare BaseException subclass")


def crash(how):
    """End this worker's process abruptly: ``exit`` (os._exit) or ``segfault``."""
    import ctypes
    import os

    if how == "exit":
        os._exit(1)
    ctypes.string_at(0)


def open_file(path):
    return open(path)


def hold_the_gil(x, seconds):
    """Sleep ``seconds`` in C while holding the GIL (``PyDLL`` does not release it), as a
    catastrophic regex or a long native call does; then return ``x``."""
    import ctypes

    ctypes.PyDLL(None).sleep(int(seconds))
    return x


def total_len(*values):
    return sum(len(v) for v in values)


class TaskWarning(UserWarning):
    """A warning class of the tests' own, to check that the category travels."""


def warn_then(x, message="careful"):
    import warnings

    warnings.warn(f"{message} {x}", TaskWarning, stacklevel=1)
    return x


def log_of(x):
    import numpy as np

    return float(np.log(np.float64(x)))


def main_module_file():
    import sys

    return getattr(sys.modules["__main__"], "__file__", None)


def slow_block(block, seconds):
    """An array block after ``seconds`` of work: costlier than moving the block."""
    time.sleep(seconds)
    return block + 1


def fail_block(block):
    raise ValueError(f"bad block of shape {block.shape}")
