"""Bytes and servers below the protocol: signed pickles (``serialize``), the embedded
redis-server (``embedded``) and the object store for large outputs (``s3``)."""
