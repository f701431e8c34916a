"""Outputs too large for Redis: the bytes in S3, a small pointer in Redis.

Redis holds every output a worker publishes, and a Redis server's memory is the scarcest
resource of a large run (ElastiCache bills it by the hour; one value is capped at 512 MB).
A *large output store* moves the big ones elsewhere: a worker that publishes a signed blob
over ``threshold_bytes`` uploads it to ``s3://<bucket>/dsl/<run-id>/o/<index>`` and stores
only ``POINTER | key`` under the output's Redis key; a worker that gathers it finds the
pointer and downloads the blob. The object holds the very same signed blob, so its MAC is
checked after the download like any other (I-5), and a pointer may only name an object of
its own run, so a forged pointer cannot make a worker read another run's data.

Lifetime, the counterpart of the Redis TTLs (I-4): the sink's worker deletes the run's
prefix together with the run's keys. A run that fails, times out or is interrupted leaves
its objects to the bucket's lifecycle rule (``dask-serverless lambda deploy --s3-bucket``
adds one that expires ``dsl/`` after a day).

The store is optional: a ``WorkerEnvironment`` carries one only when it is configured (the
AWS Lambda backend, ``DASK_SERVERLESS_S3_BUCKET``); the local backend carries none and
keeps everything in Redis.
"""

from __future__ import annotations

from typing import Any, Protocol

POINTER = b"DSLS3:"
KEY_PREFIX = "dsl/"
_DELETE_BATCH = 1000  # the most keys one S3 DeleteObjects call takes


class LargeOutputStore(Protocol):
    """Where a worker puts output blobs too large for Redis."""

    def offload(self, run_id: str, index: int, blob: bytes) -> bytes:
        """The blob to store in Redis: ``blob`` itself, or a pointer to where it went."""
        ...

    def resolve(self, run_id: str, blob: bytes) -> bytes:
        """The blob a value read from Redis stands for (downloads it if it is a pointer)."""
        ...

    def delete_run(self, run_id: str) -> None:
        """Delete every blob ``run_id`` offloaded."""
        ...


class S3OutputStore:
    """A ``LargeOutputStore`` in one S3 bucket, under ``dsl/<run-id>/``."""

    def __init__(self, client: Any, bucket: str, threshold_bytes: int) -> None:
        if threshold_bytes < len(POINTER) + 64:
            raise ValueError(f"threshold_bytes must be at least 70, got {threshold_bytes}")
        self.client = client
        self.bucket = bucket
        self.threshold_bytes = int(threshold_bytes)

    @staticmethod
    def run_prefix(run_id: str) -> str:
        return f"{KEY_PREFIX}{run_id}/"

    def object_key(self, run_id: str, index: int) -> str:
        return f"{self.run_prefix(run_id)}o/{index}"

    def offload(self, run_id: str, index: int, blob: bytes) -> bytes:
        if len(blob) <= self.threshold_bytes:
            return blob
        key = self.object_key(run_id, index)
        self.client.put_object(Bucket=self.bucket, Key=key, Body=blob)
        return POINTER + key.encode()

    def resolve(self, run_id: str, blob: bytes) -> bytes:
        if not blob.startswith(POINTER):
            return blob
        key = blob[len(POINTER) :].decode()
        if not key.startswith(self.run_prefix(run_id)):
            raise ValueError(
                f"refusing an output pointer to {key!r}: not an object of run {run_id}"
            )
        response = self.client.get_object(Bucket=self.bucket, Key=key)
        return bytes(response["Body"].read())

    def delete_run(self, run_id: str) -> None:
        """Delete the run's objects: one listing of its own prefix, batched deletes."""
        paginator = self.client.get_paginator("list_objects_v2")
        keys = [
            item["Key"]
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.run_prefix(run_id))
            for item in page.get("Contents", ())
        ]
        for start in range(0, len(keys), _DELETE_BATCH):
            batch = keys[start : start + _DELETE_BATCH]
            self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )
