"""The embedded default works wherever Python code runs, each form in a process of its own.

Local instances come from the platform's own fork server, which never imports the user's
main module: a script without an ``if __name__ == "__main__":`` guard, ``python -``,
``python -c``, IPython, a Jupyter notebook and pytest all compute with
``dask_serverless.get``, with a function defined in their own ``__main__`` (it reaches
the workers by value), and exit without a traceback from an instance.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

# What every form runs: a function of its own main module, a delayed and an array compute.
PROGRAM = textwrap.dedent(
    """
    import dask
    import dask.array as da
    import dask_serverless

    def double(x):
        return 2 * x

    value = dask.delayed(double)(21)
    total = da.ones(1000, chunks=100).sum()
    print("{form}", *dask.compute(value, total, scheduler=dask_serverless.get))
    """
)
EXPECTED = "42 1000.0"
_TIMEOUT_S = 240


def _program(form: str) -> str:
    return PROGRAM.replace("{form}", form)


def _check(done: subprocess.CompletedProcess, form: str) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{form} {EXPECTED}" in done.stdout, (done.stdout, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def _run(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=_TIMEOUT_S, **kwargs
    )


def test_a_script_without_main_guard(tmp_path):
    script = tmp_path / "no_guard.py"
    script.write_text(_program("script"))
    _check(_run([sys.executable, str(script)], tmp_path), "script")


def test_a_heredoc_on_stdin(tmp_path):
    _check(_run([sys.executable, "-"], tmp_path, input=_program("heredoc")), "heredoc")


def test_python_dash_c(tmp_path):
    _check(_run([sys.executable, "-c", _program("dash-c")], tmp_path), "dash-c")


def test_ipython(tmp_path):
    pytest.importorskip("IPython")
    args = [sys.executable, "-m", "IPython", "--quick", "--no-banner", "--colors=NoColor"]
    _check(_run([*args, "-c", _program("ipython")], tmp_path), "ipython")


NOTEBOOK_RUNNER = """
import sys
import tempfile
import nbclient
import nbformat

notebook = nbformat.v4.new_notebook()
notebook.cells = [nbformat.v4.new_code_cell(source) for source in sys.argv[1:]]
nbclient.NotebookClient(notebook, timeout=200, kernel_name="python3").execute()
for cell in notebook.cells:
    for output in cell.outputs:
        if output.get("output_type") == "stream":
            getattr(sys, output["name"]).write(output["text"])
        elif output.get("output_type") == "error":
            sys.stderr.write("Traceback: " + output["ename"] + ": " + output["evalue"] + "\\n")
"""


def test_jupyter_notebook(tmp_path):
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    imports, _, rest = _program("notebook").partition("def double")
    cells = [imports, "def double" + rest]
    _check(_run([sys.executable, "-c", NOTEBOOK_RUNNER, *cells], tmp_path), "notebook")


PYTEST_FILE = """
import dask
import dask_serverless


def test_compute_in_a_test():
    def double(x):
        return 2 * x

    assert dask.compute(dask.delayed(double)(21), scheduler=dask_serverless.get) == (42,)
    print("pytest", json.dumps("ran"))
"""


def test_pytest(tmp_path):
    (tmp_path / "test_generated.py").write_text("import json\n" + PYTEST_FILE)
    args = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider"]
    done = _run([*args, "test_generated.py"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"pytest {json.dumps('ran')}" in done.stdout
    assert "1 passed" in done.stdout
    assert "Traceback" not in done.stderr


NESTED_PROGRAM = textwrap.dedent(
    """
    import dask
    import dask_serverless

    dask.config.set({"serverless.local.concurrency": 1})

    def square(x):
        return x * x

    def fan_out(n):
        # decided at run time: how many tasks to start
        parts = [dask.delayed(square)(i) for i in range(n)]
        return sum(dask.compute(parts, scheduler=dask_serverless.get)[0])

    print("nested", dask.compute(dask.delayed(fan_out)(5), scheduler=dask_serverless.get)[0])
    """
)


def test_a_nested_compute_in_a_script(tmp_path):
    script = tmp_path / "nested.py"
    script.write_text(NESTED_PROGRAM)
    done = _run([sys.executable, str(script)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nested 30" in done.stdout
    assert "Traceback" not in done.stderr


# A function of the main module that fails in its task.
FAILING_PROGRAM = textwrap.dedent(
    """
    import dask
    import dask_serverless

    def explode(x):
        values = [x, x + 1]
        return values[5]  # the line that fails

    dask.compute(dask.delayed(explode)(1), scheduler=dask_serverless.get)
    """
)
FAILING_LINE = "return values[5]  # the line that fails"


def _check_failure(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 1, done.stderr[-3000:]
    assert "IndexError" in done.stderr and "raised by task 'explode-" in done.stderr
    assert "<dynamic-code>" not in done.stderr


def test_python_dash_c_shows_the_source_lines_of_a_failing_task(tmp_path):
    done = _run([sys.executable, "-c", FAILING_PROGRAM], tmp_path)
    _check_failure(done)
    assert '-python-c.py", line 7, in explode' in done.stderr
    assert FAILING_LINE in done.stderr
    copies = list(Path(tempfile.gettempdir()).glob("dask-serverless-*-python-c.py"))
    assert not [c for c in copies if FAILING_LINE in c.read_text()]  # deleted at exit


def test_python_dash_reading_a_file_shows_the_source_lines_of_a_failing_task(tmp_path):
    script = tmp_path / "program.py"
    script.write_text(FAILING_PROGRAM)
    with script.open() as stdin:
        done = _run([sys.executable, "-"], tmp_path, stdin=stdin)
    _check_failure(done)
    assert '-stdin.py", line 7, in explode' in done.stderr
    assert FAILING_LINE in done.stderr


def test_a_heredoc_through_a_pipe_names_its_frames_without_source(tmp_path):
    # The interpreter consumed the pipe: no copy of the code is left in the process.
    done = _run([sys.executable, "-"], tmp_path, input=FAILING_PROGRAM)
    _check_failure(done)
    assert 'File "<stdin>", line 7, in explode' in done.stderr
    assert FAILING_LINE not in done.stderr
