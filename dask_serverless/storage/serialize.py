"""Pickling, compression and signing of every blob that crosses Redis.

A blob is ``MAGIC | flags | MAC(context | flags | payload) | payload``. The client and the
workers share a secret; anything whose MAC does not check out is refused *before* it is
unpickled, so a process that can write to Redis cannot make ours run its code (I-5).
The MAC is keyed BLAKE3 (its keyed mode is a MAC; the key is derived from the secret,
which may have any length). It covers every byte, array data included: a large output
is mostly raw buffer bytes, and BLAKE3 hashes them four times faster than HMAC-SHA256 on
the same core (about a third of a millisecond for a 2 MB block).
The *context* is not stored: it names where the blob belongs (run, kind, slot — see
``protocol.record.RunSigner``) and the reader supplies it, so a validly signed blob moved
to another key, run or kind no longer checks out.
This module is the only place in the package that unpickles.

The payload is zlib-compressed pickle (run records), or pickle protocol 5 with its
buffers out of band (everything else): ``counts | buffer sizes | pickle | buffers``.
Large arrays then cost one copy into the blob and one out of it, and the check for
objects that must travel by value scans only the pickle stream, not the array data.
"""

from __future__ import annotations

import hmac
import io
import pickle
import secrets
import socket
import struct
import traceback
import zlib
from typing import Any

import blake3
import cloudpickle
from tblib import pickling_support

MAGIC = b"DSL2"
_COMPRESSED = 0x01
_OUT_OF_BAND = 0x02
_COUNTS = struct.Struct("<IQ")
_MAC_SIZE = blake3.blake3.digest_size
# BLAKE3's key derivation context: the secret becomes the 32-byte MAC key.
_KEY_CONTEXT = "dask-serverless 2026-12 blob MAC key"
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


class SignedParts:
    """A signed blob as the buffers it is made of, in order: header, pickle, array data.

    A large output goes to Redis from its arrays' own memory (the store sends each part
    as it is), never joined into one more copy of the whole; ``bytes()`` joins them.
    """

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: tuple[bytes | memoryview, ...]) -> None:
        self.parts = parts
        self.nbytes = sum(memoryview(part).nbytes for part in parts)

    def __len__(self) -> int:
        return self.nbytes

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)


class Signer:
    """Turns objects into signed blobs and back, under one secret."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("the signing secret must not be empty")
        self._key = blake3.blake3(secret, derive_key_context=_KEY_CONTEXT).digest()

    def _mac(self, context: bytes, flags: int, *parts: bytes | memoryview) -> bytes:
        mac = blake3.blake3(struct.pack("<I", len(context)), key=self._key)
        mac.update(context)
        mac.update(bytes([flags]))
        for part in parts:
            mac.update(part)
        return mac.digest()

    def dumps(self, obj: Any, compress: bool = False, context: bytes = b"") -> bytes:
        """``obj`` signed for ``context`` (where it belongs; the reader must name it too)."""
        if compress:
            flags = _COMPRESSED
            payload = zlib.compress(pickle_in_band(obj), 1)
            return b"".join((MAGIC, bytes([flags]), self._mac(context, flags, payload), payload))
        return bytes(self.dumps_parts(obj, context))

    def dumps_parts(self, obj: Any, context: bytes = b"") -> SignedParts:
        """``obj`` signed for ``context``, as the parts of its blob (``dumps`` joins them)."""
        parts = pickle_out_of_band(obj)
        header = MAGIC + bytes([_OUT_OF_BAND]) + self._mac(context, _OUT_OF_BAND, *parts)
        return SignedParts((header, *parts))

    def loads(self, blob: bytes, what: str = "blob", context: bytes = b"") -> Any:
        view = memoryview(blob)
        if len(view) < _HEADER_SIZE or bytes(view[: len(MAGIC)]) != MAGIC:
            raise UntrustedBlobError(f"refusing to unpickle {what}: it is not a signed blob")
        flags = view[len(MAGIC)]
        mac = bytes(view[len(MAGIC) + 1 : _HEADER_SIZE])
        payload = view[_HEADER_SIZE:]
        if not hmac.compare_digest(mac, self._mac(context, flags, payload)):
            raise UntrustedBlobError(
                f"refusing to unpickle {what}: its signature does not match this "
                "Scheduler's secret for this place (tampered, moved from another key, run "
                "or kind, or written with another secret)"
            )
        if flags & _COMPRESSED:
            return pickle.loads(zlib.decompress(payload))
        if flags & _OUT_OF_BAND:
            return unpickle_out_of_band(payload)
        return pickle.loads(payload)

    def dumps_exception(self, exc: BaseException, context: bytes = b"") -> bytes:
        """Sign ``exc`` with its traceback; unpicklable exceptions become RemoteError."""
        try:
            pickling_support.install(exc)
            return self.dumps(exc, context=context)
        except Exception:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            return self.dumps(RemoteError(type(exc).__qualname__, str(exc), text), context=context)


class Nested:
    """A pickle kept as bytes inside a signed blob, unpickled only when asked for.

    A large run record is opened without rebuilding the parts a worker never uses. The
    bytes were covered by the MAC of the blob they arrived in, checked before that blob
    was unpickled, so unpickling them later unpickles nothing unverified (I-5); only
    ``Nested.of`` makes one on the writing side.
    """

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    @classmethod
    def of(cls, obj: Any) -> Nested:
        return cls(pickle_in_band(obj))

    def value(self) -> Any:
        return pickle.loads(self.payload)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Nested, (self.payload,))


# Values that stand for a live resource of the process that made them. Plain pickle
# refuses them; cloudpickle (the fallback for what plain pickle refuses) would copy what an
# open file holds into an ``io.StringIO``. They are refused like a lock.
_LIVE_HANDLES = (io.IOBase, socket.socket)


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, except that an open file or socket is a ``TypeError``."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, _LIVE_HANDLES):
            raise TypeError(f"cannot pickle {type(obj).__name__!r} object (an open file or socket)")
        return super().reducer_override(obj)


def _cloudpickle(obj: Any, protocol: int, buffer_callback: Any = None) -> bytes:
    stream = io.BytesIO()
    _Pickler(stream, protocol=protocol, buffer_callback=buffer_callback).dump(obj)
    return stream.getvalue()


def _by_value_needed(stream: bytes) -> bool:
    """Lambdas, closures and anything defined in the user's script must travel by value:
    another process's ``__main__`` does not have them."""
    return b"__main__" in stream


def pickle_in_band(obj: Any) -> bytes:
    try:
        # Plain data (most task outputs) pickles several times faster than cloudpickle.
        stream = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return _cloudpickle(obj, pickle.HIGHEST_PROTOCOL)
    if _by_value_needed(stream):
        return _cloudpickle(obj, pickle.HIGHEST_PROTOCOL)
    return stream


def pickle_out_of_band(obj: Any) -> list[bytes | memoryview]:
    """``obj`` as the parts of an out-of-band payload (joined by the caller)."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        stream = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        by_value = _by_value_needed(stream)
    except Exception:
        by_value = True
    if by_value:
        buffers = []
        stream = _cloudpickle(obj, 5, buffers.append)
    try:
        raws = [buffer.raw() for buffer in buffers]
    except BufferError:
        # A non-contiguous buffer: keep everything in band.
        raws, stream = [], pickle_in_band(obj)
    counts = _COUNTS.pack(len(raws), len(stream))
    sizes = struct.pack(f"<{len(raws)}Q", *(raw.nbytes for raw in raws))
    return [counts, sizes, stream, *raws]


def unpickle_out_of_band(payload: memoryview) -> Any:
    count, stream_size = _COUNTS.unpack_from(payload)
    offset = _COUNTS.size
    sizes = struct.unpack_from(f"<{count}Q", payload, offset)
    offset += 8 * count
    stream = payload[offset : offset + stream_size]
    offset += stream_size
    buffers = []
    for size in sizes:
        # A copy, so that arrays come back writable, as in-band pickle gives them.
        buffers.append(bytearray(payload[offset : offset + size]))
        offset += size
    return pickle.loads(stream, buffers=buffers)
