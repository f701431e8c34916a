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

A main module that is no file gets one (``main_source_file``), where the process still
has its source: a copy in the temporary directory, deleted at exit, which the frames of
its functions name — every traceback printer finds the lines there (CPython 3.11's own
reads files, not ``linecache``):

- ``python -c CODE``: CPython keeps the command in ``sys.orig_argv`` (its code is named
  ``<string>``);
- ``python -`` (or ``python < file``): the interpreter read its code, named ``<stdin>``,
  from standard input. When that is a regular file (``python - < script.py``, or a
  here-document bash ≥ 5.1 stores in a temporary file because it exceeds a pipe's
  buffer), it is read again from offset 0. From a pipe (a short here-document in bash ≥
  5.1, ``cat script.py | python -``) the interpreter consumed it and nothing in the
  process holds it any more: those frames keep showing no source line.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import stat
import sys
import tempfile
import types
from collections.abc import Iterable
from typing import Any

from dask._task_spec import GraphNode
from tblib import Traceback

# The file name cloudpickle gives the code of every function it pickles by value.
DYNAMIC_CODE = "<dynamic-code>"
# The names CPython gives the code of ``python -c`` and of a main read from stdin.
COMMAND_CODE = "<string>"
STDIN_CODE = "<stdin>"


def main_source() -> tuple[str, str] | None:
    """``(code file name, source)`` of a main module that is no file, when the process
    still has its source (see the module docstring); else None."""
    argv = list(getattr(sys, "orig_argv", ()))
    if sys.argv[:1] == ["-c"]:
        for position, arg in enumerate(argv[1:-1], start=1):
            if arg == "-c" or (arg[:1] == "-" and arg[1:].isalpha() and arg.endswith("c")):
                return COMMAND_CODE, argv[position + 1]
        return None
    if sys.argv[:1] not in (["-"], [""]):
        return None
    try:
        status = os.fstat(0)
        if not stat.S_ISREG(status.st_mode):
            return None
        return STDIN_CODE, os.pread(0, status.st_size, 0).decode()
    except (OSError, UnicodeDecodeError):
        return None


def main_source_file() -> dict[str, str]:
    """For a main module that is no file: its code's file name mapped to a copy of its
    source, written once per process and deleted at exit; else empty."""
    found = main_source()
    if found is None:
        return {}
    code_name, source = found
    kind = "python-c" if code_name == COMMAND_CODE else "stdin"
    path = os.path.join(tempfile.gettempdir(), f"dask-serverless-{os.getpid()}-{kind}.py")
    try:
        # Created here or never (no symlink followed, nobody else's file taken for ours).
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        with open(path) as file:
            return {code_name: path} if file.read() == source else {}
    except OSError:
        return {}
    with os.fdopen(handle, "w") as file:
        file.write(source)
    atexit.register(_remove, path)
    return {code_name: path}


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


class SourceIndex:
    """Where the code of the functions a run may call came from, by function name."""

    def __init__(self) -> None:
        self._spans: dict[str, list[tuple[str, int, int]]] = {}
        # Code file names of a main that is no file → the copy of its source.
        self.renamed: dict[str, str] = {}

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
        """Index the functions and methods defined at the top of ``__main__``, and give
        it a source file when it is no file (``main_source_file``)."""
        self.renamed.update(main_source_file())
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
                return self.renamed.get(filename, filename)
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
    """``tb`` rebuilt with known origins; unchanged when no frame is by-value code or
    code of a main that is no file."""
    data = Traceback(tb).to_dict()
    changed = False
    entry: dict[str, Any] | None = data
    while entry is not None:
        code = entry["tb_frame"]["f_code"]
        if code["co_filename"] == DYNAMIC_CODE or code["co_filename"] in index.renamed:
            origin = index.origin(code["co_name"], entry["tb_lineno"])
            if origin is not None:
                code["co_filename"] = origin
                changed = True
        entry = entry["tb_next"]
    if not changed:
        return tb
    return Traceback.from_dict(data).as_traceback()
