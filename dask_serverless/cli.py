"""The ``dask-serverless`` command line.

``dask-serverless lambda …`` deploys, inspects, checks and removes the AWS Lambda worker
functions, and ``serve-local`` runs a local endpoint that speaks Lambda's Invoke API so the
Lambda backend can be tried without an AWS account. The commands only parse options and
call ``backends.aws_lambda.deploy`` and ``backends.aws_lambda.endpoint``; boto3 (the ``aws`` extra)
is imported only when a lambda command runs.

Secrets stay off the command line (I-5): the signing secret comes from an environment
variable or a Secrets Manager ARN, and the Redis URL may too.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import click

from dask_serverless import config

_REDIS_ENV = "DASK_SERVERLESS_REDIS_URL"


def _memory_sizes(values: Sequence[str], more: Sequence[int]) -> tuple[int, ...]:
    """``--memory 512 1024`` (the sizes after the first arrive as arguments) or ``512,1024``."""
    sizes = {int(m) for value in values for m in value.split(",") if m.strip()} | set(more)
    if not sizes:
        sizes = {int(m) for m in config.setting("lambda.memory-sizes")}
    return tuple(sorted(sizes))


def _default_memory(sizes: tuple[int, ...], chosen: int | None) -> int:
    """The chosen default, else the configured one if deployed, else the middle size."""
    if chosen is not None:
        return chosen
    configured = int(config.setting("lambda.default-memory"))
    return configured if configured in sizes else sizes[len(sizes) // 2]


def _pairs(values: Sequence[str]) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, setting = value.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected NAME=VALUE, got {value!r}", param_hint="--env")
        pairs[name] = setting
    return pairs


def _session(region: str | None) -> Any:
    import boto3

    return boto3.session.Session(region_name=region)


def _fail(error: Exception) -> NoReturn:
    raise click.ClickException(str(error)) from error


def _required_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    """``--name`` is required unless serverless.lambda.function names the functions."""
    if not value:
        raise click.MissingParameter(ctx=ctx, param=param)
    return value


name_option = click.option(
    "--name",
    default=lambda: config.setting("lambda.function"),
    callback=_required_name,
    required=True,
    help="Base name of the functions (they are <name>-<memory MB>); "
    "default: serverless.lambda.function.",
)
region_option = click.option("--region", help="AWS region (default: boto3's, e.g. AWS_REGION).")
memory_option = click.option(
    "--memory",
    multiple=True,
    help="Memory sizes in MB: --memory 512 1024 1769 3008 (or 512,1024,…); "
    "default: serverless.lambda.memory-sizes.",
)
s3_threshold_option = click.option(
    "--s3-threshold",
    type=int,
    default=1024 * 1024,
    show_default=True,
    help="Outputs larger than this many bytes go to --s3-bucket.",
)
more_memory_argument = click.argument("more_memory", nargs=-1, type=int, metavar="[MEMORY_MB]...")


@click.group()
@click.version_option(package_name="dask-serverless")
def main() -> None:
    """Run ordinary Dask graphs on serverless workers that coordinate through Redis."""


@main.group("lambda")
def lambda_() -> None:
    """AWS Lambda workers: deploy, status, check, remove, policy, serve-local."""


@lambda_.command()
@name_option
@memory_option
@more_memory_argument
@click.option("--default-memory", type=int, help="Size used when a plan names none.")
@click.option(
    "--timeout", "timeout_s", default=900, show_default=True, help="Seconds, at most 900."
)
@click.option(
    "--redis", "redis_url", envvar=_REDIS_ENV, help=f"Workers' Redis URL (or ${_REDIS_ENV})."
)
@click.option("--redis-secret-arn", help="Secrets Manager ARN holding the Redis URL instead.")
@click.option(
    "--secret-arn",
    help="Secrets Manager ARN of the signing secret; else $DASK_SERVERLESS_SECRET is used.",
)
@click.option("--role-arn", help="Execution role to use; default: make <name>-role.")
@click.option(
    "--requirements",
    type=click.Path(exists=True, dir_okay=False),
    help="requirements.txt to install into the zip; default: this package's dependencies.",
)
@click.option("--package-zip", type=click.Path(exists=True, dir_okay=False), help="Prebuilt zip.")
@click.option("--no-deps", is_flag=True, help="Zip only this package (dependencies in a layer).")
@click.option("--image-uri", help="Container image (ECR) to deploy instead of a zip.")
@click.option("--code-bucket", help="S3 bucket to upload the zip through (needed over 50 MB).")
@click.option(
    "--runtime", default="python3.11", show_default=True, help="Lambda runtime of the functions."
)
@click.option(
    "--architecture",
    type=click.Choice(["x86_64", "arm64"]),
    default="x86_64",
    show_default=True,
    help="Instruction set of the functions (and of the wheels packaged for them).",
)
@click.option("--s3-bucket", help="Bucket for outputs too large for Redis.")
@s3_threshold_option
@click.option(
    "--handoff-margin",
    type=int,
    default=30,
    show_default=True,
    help="Seconds before the timeout at which a worker hands its branch to a fresh one.",
)
@click.option("--subnet-id", multiple=True, help="VPC subnet (repeat); for a private Redis.")
@click.option("--security-group-id", multiple=True, help="VPC security group (repeat).")
@click.option("--env", multiple=True, help="Extra NAME=VALUE for the functions (repeat).")
@region_option
def deploy(
    name: str,
    memory: Sequence[str],
    more_memory: Sequence[int],
    default_memory: int | None,
    timeout_s: int,
    redis_url: str | None,
    redis_secret_arn: str | None,
    secret_arn: str | None,
    role_arn: str | None,
    requirements: str | None,
    package_zip: str | None,
    no_deps: bool,
    image_uri: str | None,
    code_bucket: str | None,
    runtime: str,
    architecture: str,
    s3_bucket: str | None,
    s3_threshold: int,
    handoff_margin: int,
    subnet_id: Sequence[str],
    security_group_id: Sequence[str],
    env: Sequence[str],
    region: str | None,
) -> None:
    """Create or update one worker function per memory size.

    \b
    dask-serverless lambda deploy --name dsl-worker --memory 512 1024 1769 3008 \\
        --redis rediss://… --requirements requirements.txt
    """
    from dask_serverless.backends.aws_lambda import deploy as lambda_deploy

    if sum(map(bool, (image_uri, package_zip, requirements or no_deps))) > 1:
        raise click.UsageError(
            "choose one package: --image-uri, --package-zip, or a zip built here "
            "(--requirements / --no-deps)"
        )
    sizes = _memory_sizes(memory, more_memory)
    try:
        spec = lambda_deploy.DeploySpec(
            name=name,
            memory_sizes=sizes,
            default_memory=_default_memory(sizes, default_memory),
            timeout_s=timeout_s,
            runtime=runtime,
            architecture=architecture,
            role_arn=role_arn,
            redis_url=redis_url,
            redis_url_secret_arn=redis_secret_arn,
            secret=None if secret_arn else os.environ.get(config.SECRET_ENV),
            secret_arn=secret_arn,
            image_uri=image_uri,
            code_bucket=code_bucket,
            s3_bucket=s3_bucket,
            s3_threshold_bytes=s3_threshold,
            handoff_margin_s=handoff_margin,
            subnet_ids=tuple(subnet_id),
            security_group_ids=tuple(security_group_id),
            extra_environment=_pairs(env),
        )
        package = None
        if package_zip:
            with open(package_zip, "rb") as file:
                package = file.read()
        elif not image_uri:
            what = "this package only" if no_deps else "pip: wheels for the Lambda runtime"
            click.echo(f"building  the zip package ({what}) …")
            package = lambda_deploy.build_package(
                requirements,
                with_dependencies=not no_deps,
                runtime=runtime,
                architecture=architecture,
            )
        lambda_deploy.deploy(spec, _session(region), package, echo=click.echo)
    except Exception as error:
        _fail(error)
    snippet = {
        "serverless": {
            "backend": "lambda",
            "lambda": {
                "function": spec.name,
                "memory-sizes": list(spec.memory_sizes),
                "default-memory": spec.default_memory,
            },
        }
    }
    click.echo(
        "\nUse it with the same signing secret in the client (DASK_SERVERLESS_SECRET):\n"
        f'  Scheduler(backend="lambda", lambda_function="{spec.name}", redis="…")\n'
        "or put this in ~/.config/dask/serverless.yaml:\n"
        f"  {json.dumps(snippet)}"
    )


@lambda_.command()
@name_option
@region_option
def status(name: str, region: str | None) -> None:
    """Show the deployed worker functions (without their variables' values)."""
    from dask_serverless.backends.aws_lambda import deploy as lambda_deploy

    try:
        found = lambda_deploy.functions(_session(region), name)
    except Exception as error:
        _fail(error)
    if not found:
        raise click.ClickException(f"no functions named {name}-<MB> found")
    for configuration in found:
        click.echo(lambda_deploy.describe(configuration))


@lambda_.command()
@name_option
@memory_option
@more_memory_argument
@region_option
@click.option("--endpoint-url", help="Lambda API endpoint (default: AWS).")
def check(
    name: str,
    memory: Sequence[str],
    more_memory: Sequence[int],
    region: str | None,
    endpoint_url: str | None,
) -> None:
    """Invoke each function once: does it start, read its settings and reach Redis?"""
    from dask_serverless.backends import aws_lambda
    from dask_serverless.backends.aws_lambda import deploy as lambda_deploy

    sizes = _memory_sizes(memory, more_memory)
    try:
        settings = aws_lambda.LambdaSettings(
            name, sizes, sizes[0], region=region, endpoint_url=endpoint_url, max_attempts=3
        )
        healthy = lambda_deploy.check(settings, _session(region), echo=click.echo)
    except Exception as error:
        _fail(error)
    if not healthy:
        sys.exit(1)


@lambda_.command()
@name_option
@region_option
@click.option("--delete-role", is_flag=True, help="Also delete <name>-role made by deploy.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def remove(name: str, region: str | None, delete_role: bool, yes: bool) -> None:
    """Delete the worker functions <name>-<MB> (and, if asked, their role)."""
    from dask_serverless.backends.aws_lambda import deploy as lambda_deploy

    if not yes:
        click.confirm(f"Delete every function {name}-<MB>?", abort=True)
    try:
        removed = lambda_deploy.remove(_session(region), name, delete_role, echo=click.echo)
    except Exception as error:
        _fail(error)
    if not removed:
        click.echo(f"no functions named {name}-<MB> found")


@lambda_.command()
@name_option
@region_option
@click.option("--s3-bucket", help="Bucket for large outputs the workers may read and write.")
@click.option("--secret-arn", "secret_arns", multiple=True, help="Secret the workers read.")
def policy(
    name: str, region: str | None, s3_bucket: str | None, secret_arns: Sequence[str]
) -> None:
    """Print the IAM policy the workers' role needs (besides AWSLambdaBasicExecutionRole)."""
    from dask_serverless.backends.aws_lambda import deploy as lambda_deploy

    try:
        account = lambda_deploy.Account.of(_session(region))
    except Exception as error:
        _fail(error)
    document = lambda_deploy.worker_policy(name, account, s3_bucket, secret_arns)
    click.echo(json.dumps(document, indent=2))


@lambda_.command("serve-local")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=9001, show_default=True, help="0 picks a free port.")
@click.option(
    "--redis", "redis_url", envvar=_REDIS_ENV, required=True, help=f"Redis URL (or ${_REDIS_ENV})."
)
@click.option(
    "--secret-env",
    default=config.SECRET_ENV,
    show_default=True,
    help="Environment variable holding the signing secret the clients use.",
)
@memory_option
@more_memory_argument
@click.option("--default-memory", type=int, help="Size used when an invocation names none.")
@click.option("--concurrency", type=int, help="Instances per function at most (default: CPUs).")
@click.option(
    "--timeout",
    "timeout_s",
    default=900,
    show_default=True,
    help="Seconds an invocation may run, as a function's timeout.",
)
@click.option(
    "--handoff-margin",
    "handoff_margin_s",
    type=int,
    default=0,
    show_default=True,
    help="Seconds before the timeout at which a worker hands its branch to a fresh one.",
)
@click.option("--throttle-first", default=0, help="Answer 429 to the first N requests.")
@click.option("--throttle-every", default=0, help="Answer 429 to every N-th request.")
@click.option("--s3-bucket", help="Large outputs bucket (S3 endpoint: $AWS_ENDPOINT_URL_S3).")
@s3_threshold_option
@click.option("--env", multiple=True, help="Extra NAME=VALUE for the workers (repeat).")
def serve_local(
    host: str,
    port: int,
    redis_url: str,
    secret_env: str,
    memory: Sequence[str],
    more_memory: Sequence[int],
    default_memory: int | None,
    concurrency: int | None,
    timeout_s: int,
    handoff_margin_s: int,
    throttle_first: int,
    throttle_every: int,
    s3_bucket: str | None,
    s3_threshold: int,
    env: Sequence[str],
) -> None:
    """Serve Lambda's Invoke API locally, running the workers on the local pool.

    Any function named <base>-<memory MB> exists. Point the client at it with
    Scheduler(backend="lambda", lambda_function=<base>, lambda_endpoint_url=<url>) or
    AWS_ENDPOINT_URL_LAMBDA=<url>.
    """
    from dask_serverless.backends import aws_lambda
    from dask_serverless.backends.aws_lambda.endpoint import LambdaEndpoint

    secret = os.environ.get(secret_env)
    if not secret:
        raise click.UsageError(f"set the signing secret in ${secret_env} (the clients use it too)")
    variables = {
        aws_lambda.ENV_REDIS_URL: redis_url,
        aws_lambda.ENV_SECRET: secret,
        aws_lambda.ENV_HANDOFF_MARGIN: str(handoff_margin_s * 1000),
        **_pairs(env),
    }
    if s3_bucket:
        variables[aws_lambda.ENV_S3_BUCKET] = s3_bucket
        variables[aws_lambda.ENV_S3_THRESHOLD] = str(s3_threshold)
        if os.environ.get("AWS_ENDPOINT_URL_S3"):
            variables["AWS_ENDPOINT_URL_S3"] = os.environ["AWS_ENDPOINT_URL_S3"]
    sizes = _memory_sizes(memory, more_memory)
    try:
        endpoint = LambdaEndpoint(
            variables,
            host=host,
            port=port,
            memory_sizes=sizes,
            default_memory=_default_memory(sizes, default_memory),
            concurrency=concurrency,
            invocation_timeout_ms=timeout_s * 1000,
            throttle_first=throttle_first,
            throttle_every=throttle_every,
        )
    except OSError as error:
        raise click.ClickException(
            f"cannot serve on {host}:{port}: {error.strerror or error} "
            "(another process listens there? --port 0 picks a free port)"
        ) from None
    _serve_until_stopped(
        f"Lambda endpoint on {endpoint.url} (functions <base>-<MB>); Ctrl-C stops it",
        endpoint.serve_forever,
        endpoint.close,
    )


# -- seeing runs: the run history, reports, what the planner knows, the dashboard ---------

redis_option = click.option(
    "--redis",
    "redis_url",
    envvar=_REDIS_ENV,
    default=lambda: config.setting("redis"),
    required=True,
    help=f"Redis URL of the runs (or ${_REDIS_ENV}; default: serverless.redis).",
)


def _run_history(redis_url: str) -> Any:
    from dask_serverless.protocol.runs import RunHistory
    from dask_serverless.protocol.store import connect

    try:
        client = connect(redis_url)
    except ConnectionError as error:
        _fail(error)
    keep = max(1, int(config.setting("history.runs")))
    return RunHistory(client, keep, int(config.setting("planning.history-ttl")))


@main.command()
@redis_option
@click.option("--last", default=20, show_default=True, help="How many runs, newest first.")
def runs(redis_url: str, last: int) -> None:
    """List recent runs: when, tasks, planner, SLA, makespans, cost, status."""
    from dask_serverless.runs import recent_summaries, runs_table

    click.echo(runs_table(recent_summaries(_run_history(redis_url), last)))


@main.command()
@click.argument("run_id")
@redis_option
@click.option("--html", "html_file", type=click.Path(dir_okay=False), help="Write HTML here.")
def report(run_id: str, redis_url: str, html_file: str | None) -> None:
    """Print one run's report (RUN_ID or a unique prefix), or write it as HTML."""
    from dask_serverless.runs import find_report, makespans, recent_summaries

    history = _run_history(redis_url)
    found = find_report(history, run_id, history.keep)
    if found is None:
        raise click.ClickException(f"no run {run_id!r} in the run history")
    if html_file:
        others = makespans(recent_summaries(history, history.keep))
        click.echo(f"wrote {found.to_html(html_file, others)}")
    else:
        click.echo(str(found.summary()) + "\n" + found.table(limit=None))


@main.command()
@click.argument("function")
@redis_option
@click.option(
    "--sla",
    default=lambda: config.setting("planning.sla"),
    show_default="p95",
    help="Statistic the predictions use: average or a percentile p50…p99.",
)
def history(function: str, redis_url: str, sla: str) -> None:
    """What the planner knows of FUNCTION (key prefix or full identity)."""
    from dask_serverless.protocol.history import HistoryStore
    from dask_serverless.runs import function_history

    runs_store = _run_history(redis_url)
    samples = HistoryStore(runs_store.client, int(config.setting("planning.history-samples")))
    sizes = [int(m) for m in config.setting("planning.memory-configs")]
    click.echo(function_history(samples, runs_store, function, sizes, sla))


@main.command()
@redis_option
@click.option(
    "--port",
    default=lambda: config.setting("dashboard.port"),
    show_default="8788",
    help="0 picks a free port.",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; the page shows task keys and run ids.",
)
def dashboard(redis_url: str, port: int, host: str) -> None:
    """Serve the live dashboard of the runs on a Redis server."""
    from dask_serverless.dashboard import Dashboard

    try:
        server = Dashboard(redis_url, int(port), host).start()
    except RuntimeError as error:
        _fail(error)
    _serve_until_stopped(
        f"dask-serverless dashboard: {server.url} (Ctrl-C stops it)",
        server.serve_forever,
        server.stop,
    )


def _serve_until_stopped(
    address: str, serve_forever: Callable[[], None], stop: Callable[[], None]
) -> None:
    """Print where a server listens, serve until Ctrl-C or SIGTERM, then stop it."""
    signal.signal(signal.SIGTERM, _interrupt)
    click.echo(address)
    sys.stdout.flush()
    try:
        serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
