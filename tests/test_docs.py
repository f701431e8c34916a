"""Every command in the docs works as written, and the CLI keeps its promises.

The Python blocks of README.md run here (a Redis URL in them is replaced by the test
server's); the "Trying it without AWS" section of docs/aws-lambda.md runs its shell and
Python blocks with the AWS variables removed; every ``dask-serverless`` and
``python -m benchmarks`` command line in the docs is parsed by the real parser; the
README's test command is what CI runs.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import click
import dask
import pytest
from click.testing import CliRunner

from benchmarks.__main__ import parse_args as parse_benchmark_args
from dask_serverless import Scheduler
from dask_serverless.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/README.md"]
AWS_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def blocks(path: Path, language: str) -> list[str]:
    """The fenced code blocks of ``path`` in ``language``, in order."""
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def command_lines(language: str = "bash") -> list[str]:
    """Every command of every shell block of the docs, continuation lines joined."""
    lines = []
    for path in DOCS:
        for block in blocks(path, language):
            lines += [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def with_test_redis(code: str, redis_url: str) -> str:
    return re.sub(r"redis://127\.0\.0\.1:\d+/0", redis_url, code)


def test_readme_python_blocks_run(redis_url, capsys):
    """In order and in one namespace, as a reader runs them in one session."""
    namespace: dict = {}
    try:
        for code in blocks(ROOT / "README.md", "python"):
            exec(compile(with_test_redis(code, redis_url), "README.md", "exec"), namespace)
    finally:
        for value in namespace.values():
            if isinstance(value, Scheduler):
                value.close()
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 2


def test_readme_first_command_runs_the_example():
    done = subprocess.run(
        [sys.executable, "-m", "dask_serverless.example"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    assert "same as dask's threaded scheduler" in done.stdout


def test_readme_test_command_is_what_ci_runs():
    readme = ROOT / "README.md"
    install_and_test = [b.strip() for b in blocks(readme, "bash") if "pytest" in b]
    assert install_and_test == ["pip install -e '.[test]' && python -m pytest"]
    assert install_and_test[0] in (ROOT / ".ci/run").read_text().splitlines()


def parse_cli(line: str) -> None:
    """Parse a ``dask-serverless …`` line with the real parser, without running it."""
    args = shlex.split(line.split(" #")[0])[1:]
    args = [a for a in args if a != "&"]
    command: click.Command = main
    names = ["dask-serverless"]
    while isinstance(command, click.Group):
        name, args = args[0], args[1:]
        names.append(name)
        found = command.commands.get(name)
        assert found is not None, f"{line!r}: no command {name!r}"
        command = found
    command.make_context(" ".join(names), args)


def test_every_cli_line_in_the_docs_parses(tmp_path, monkeypatch):
    (tmp_path / "requirements.txt").write_text("numpy\n")
    monkeypatch.chdir(tmp_path)
    lines = [line for line in command_lines() if line.lstrip().startswith("dask-serverless ")]
    assert len(lines) >= 6
    for line in lines:
        parse_cli(line.strip())


def test_every_benchmark_line_in_the_docs_parses():
    lines = [line for line in command_lines() if line.startswith("python -m benchmarks")]
    assert lines
    for line in lines:
        words = shlex.split(line.split(" #")[0])
        if words[2] == "benchmarks":
            parse_benchmark_args(words[3:])
        else:
            assert (ROOT / (words[2].replace(".", "/") + ".py")).exists(), line


def test_pip_extras_named_in_the_docs_exist():
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in re.findall(r"dask-serverless\[(\w+)\]", "".join(p.read_text() for p in DOCS)):
        assert re.search(rf"^{extra} = \[", pyproject, flags=re.M), extra


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_trying_it_without_aws_works_as_written(redis_url, secret_hex, monkeypatch):
    """The section's shell block starts the endpoint, its Python block computes."""
    doc = ROOT / "docs/aws-lambda.md"
    section = doc.read_text().split("## Trying it without AWS")[1]
    shell = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    python = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    port = str(free_port())
    serve = next(line for line in shell.splitlines() if "serve-local" in line)
    serve = with_test_redis(serve, redis_url).replace("9001", port).rstrip(" &")
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("DASK_SERVERLESS_SECRET", secret_hex)
    command = [sys.executable, "-m", "dask_serverless.cli", *shlex.split(serve)[1:]]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        try:
            assert p.stdout is not None
            assert "Lambda endpoint on" in p.stdout.readline()
            code = with_test_redis(python, redis_url).replace("9001", port)
            exec(compile(code, str(doc), "exec"), {})
        finally:
            p.send_signal(signal.SIGINT)
            p.wait(timeout=30)


@pytest.fixture
def secret_hex() -> str:
    return os.urandom(32).hex()


# -- the CLI -----------------------------------------------------------------------


def all_commands() -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []
    pending: list[tuple[str, click.Command]] = [("dask-serverless", main)]
    while pending:
        name, command = pending.pop()
        found.append((name, command))
        if isinstance(command, click.Group):
            pending += [(f"{name} {sub}", c) for sub, c in command.commands.items()]
    return found


def test_every_option_has_help():
    missing = [
        f"{name} {param.opts[0]}"
        for name, command in all_commands()
        for param in command.params
        if isinstance(param, click.Option) and not param.help and param.name != "version"
    ]
    assert not missing


def test_lambda_remove_requires_a_name():
    with dask.config.set({"serverless.lambda.function": None}):
        result = CliRunner().invoke(main, ["lambda", "remove", "--yes"])
    assert result.exit_code == 2
    assert "Missing option '--name'" in result.output
    assert "None-" not in result.output


def test_serve_local_on_a_busy_port_fails_cleanly(redis_url, secret_hex):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = CliRunner().invoke(
            main,
            ["lambda", "serve-local", "--port", port, "--redis", redis_url],
            env={"DASK_SERVERLESS_SECRET": secret_hex},
        )
    assert result.exit_code == 1
    assert f"Error: cannot serve on 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output
