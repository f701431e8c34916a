"""Pickling, compression and signing of every blob that crosses Redis.

A blob is ``MAGIC | flags | HMAC-SHA256(flags | payload) | payload``. The client and the
workers share a secret; anything whose MAC does not check out is refused *before* it is
unpickled, so a process that can write to Redis cannot make ours run its code (I-5).
This module is the only place in the package that unpickles.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import secrets
import traceback
import zlib
from typing import Any

import cloudpickle
from tblib import pickling_support

MAGIC = b"DSL1"
_COMPRESSED = 0x01
_MAC_SIZE = hashlib.sha256().digest_size
_HEADER_SIZE = len(MAGIC) + 1 + _MAC_SIZE


class UntrustedBlobError(RuntimeError):
    """A blob read from Redis is unsigned, truncated or signed with another secret."""


class RemoteError(Exception):
    """Stands in for a task's exception that could not be pickled.

    Keeps the original type's name, its message and the remote traceback text, so the
    user still sees what failed and where.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __reduce__(self) -> tuple:
        return (RemoteError, (self.type_name, self.message, self.traceback_text))

    def __str__(self) -> str:
        return f"{self.args[0]}\n\nRemote traceback:\n{self.traceback_text}"


def new_secret() -> bytes:
    """A fresh random secret, for a Scheduler whose workers it starts itself."""
    return secrets.token_bytes(32)


class Signer:
    """Turns objects into signed blobs and back, under one secret."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("the signing secret must not be empty")
        self._secret = secret

    def _mac(self, flags: int, payload: bytes | memoryview) -> bytes:
        mac = hmac.new(self._secret, bytes([flags]), hashlib.sha256)
        mac.update(payload)
        return mac.digest()

    def dumps(self, obj: Any, compress: bool = False) -> bytes:
        try:
            # Plain data (most task outputs) pickles several times faster this way.
            payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            payload = b"__main__"
        if b"__main__" in payload:
            # Lambdas, closures and anything defined in the user's script must travel by
            # value: another process's __main__ does not have them.
            payload = cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        flags = 0
        if compress:
            payload = zlib.compress(payload, 1)
            flags |= _COMPRESSED
        return b"".join((MAGIC, bytes([flags]), self._mac(flags, payload), payload))

    def loads(self, blob: bytes, what: str = "blob") -> Any:
        view = memoryview(blob)
        if len(view) < _HEADER_SIZE or bytes(view[: len(MAGIC)]) != MAGIC:
            raise UntrustedBlobError(f"refusing to unpickle {what}: it is not a signed blob")
        flags = view[len(MAGIC)]
        mac = bytes(view[len(MAGIC) + 1 : _HEADER_SIZE])
        payload = view[_HEADER_SIZE:]
        if not hmac.compare_digest(mac, self._mac(flags, payload)):
            raise UntrustedBlobError(
                f"refusing to unpickle {what}: its signature does not match this "
                "Scheduler's secret (tampered, or written with another secret)"
            )
        data = zlib.decompress(payload) if flags & _COMPRESSED else payload
        return pickle.loads(data)

    def dumps_exception(self, exc: BaseException) -> bytes:
        """Sign ``exc`` with its traceback; unpicklable exceptions become RemoteError."""
        try:
            pickling_support.install(exc)
            return self.dumps(exc)
        except Exception:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            return self.dumps(RemoteError(type(exc).__qualname__, str(exc), text))
