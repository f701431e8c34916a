"""Give a task's traceback back its source lines, in the client.

Functions defined in ``__main__``, a notebook cell or another module the workers cannot
import travel by value: cloudpickle rebuilds their code with the file name
``<dynamic-code>``, so a remote traceback would show ``File "<dynamic-code>"`` and no
source. The client still has those functions. ``SourceIndex`` collects, from the run's
task-spec nodes and the ``__main__`` module, where each function's code came from
(file, first and last line); ``with_sources`` rewrites the remote frames named
``<dynamic-code>`` to that file, so ``traceback`` finds the lines in the client's
``linecache`` (scripts, IPython and Jupyter cells are there). Everything here is
explicit loops over stacks: no recursion over graphs or exception chains.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Iterable
from typing import Any

from dask._task_spec import GraphNode
from tblib import Traceback

# The file name cloudpickle gives the code of every function it pickles by value.
DYNAMIC_CODE = "<dynamic-code>"


class SourceIndex:
    """Where the code of the functions a run may call came from, by function name."""

    def __init__(self) -> None:
        self._spans: dict[str, list[tuple[str, int, int]]] = {}

    def add_code(self, code: types.CodeType) -> None:
        """Index ``code`` and the code objects nested in it (inner functions, lambdas)."""
        stack = [code]
        while stack:
            current = stack.pop()
            lines = [line for _, _, line in current.co_lines() if line is not None]
            last = max(lines, default=current.co_firstlineno)
            span = (current.co_filename, current.co_firstlineno, last)
            self._spans.setdefault(current.co_name, []).append(span)
            stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))

    def add_objects(self, objects: Iterable[Any]) -> None:
        """Index the functions among ``objects``, looking into task-spec nodes, partials
        and containers."""
        stack = list(objects)
        seen: set[int] = set()
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, types.FunctionType):
                self.add_code(obj.__code__)
            elif isinstance(obj, types.MethodType):
                stack.append(obj.__func__)
            elif isinstance(obj, functools.partial):
                stack.extend((obj.func, *obj.args, *obj.keywords.values()))
            elif isinstance(obj, GraphNode):
                stack.extend(
                    getattr(obj, name) for name in ("func", "args", "kwargs") if hasattr(obj, name)
                )
            elif isinstance(obj, (list, tuple, set, frozenset)):
                stack.extend(obj)
            elif isinstance(obj, dict):
                stack.extend(obj.values())

    def add_main_module(self) -> None:
        """Index the functions and methods defined at the top of ``__main__``."""
        main = sys.modules.get("__main__")
        for value in list(vars(main).values()) if main is not None else ():
            if isinstance(value, type) and value.__module__ == "__main__":
                self.add_objects(vars(value).values())
            elif getattr(value, "__module__", None) == "__main__":
                self.add_objects([value])

    def origin(self, name: str, line: int) -> str | None:
        """The file of the function ``name`` whose lines include ``line``, if known."""
        for filename, first, last in self._spans.get(name, ()):
            if first <= line <= last:
                return filename
        return None


def with_sources(exc: BaseException, index: SourceIndex) -> BaseException:
    """``exc`` (and its causes) with ``<dynamic-code>`` frames pointing at their files."""
    pending: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if current.__traceback__ is not None:
            current.__traceback__ = _restored(current.__traceback__, index)
        pending.extend((current.__cause__, current.__context__))
    return exc


def _restored(tb: types.TracebackType, index: SourceIndex) -> types.TracebackType:
    """``tb`` rebuilt with known origins; unchanged when no frame is by-value code."""
    data = Traceback(tb).to_dict()
    changed = False
    entry: dict[str, Any] | None = data
    while entry is not None:
        code = entry["tb_frame"]["f_code"]
        if code["co_filename"] == DYNAMIC_CODE:
            origin = index.origin(code["co_name"], entry["tb_lineno"])
            if origin is not None:
                code["co_filename"] = origin
                changed = True
        entry = entry["tb_next"]
    if not changed:
        return tb
    return Traceback.from_dict(data).as_traceback()
