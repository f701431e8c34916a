"""What one large block costs on its way through Redis, stage by stage, in CPU time.

``python -m benchmarks.blocks [--mb 2] [--rounds 40]``

A worker that publishes a block signs it (pickle with the buffers out of band, MAC) and
sends it with the ``complete`` script; a worker that reads it fetches it (``MGET``) and
opens it (MAC check, unpickle). Each stage is timed here on its own, against an embedded
redis-server, as process CPU time (less sensitive than wall time to other jobs on the
machine) and as the redis-server's CPU for the Redis stages. The MAC's share is put next
to HMAC-SHA256 and a plain copy of the same bytes, for reference.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

from benchmarks.schedulers import import_ours


def server_cpu_s(pid: int) -> float:
    """CPU seconds process ``pid`` has used (user and system)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_ms(action: Callable[[], object], rounds: int, server_pid: int) -> tuple[float, float]:
    """Median CPU ms per call of ``action``, this process and the server, over 5 batches."""
    ours, server = [], []
    for _ in range(5):
        started, server_started = time.process_time(), server_cpu_s(server_pid)
        for _ in range(rounds):
            action()
        ours.append((time.process_time() - started) / rounds * 1e3)
        server.append((server_cpu_s(server_pid) - server_started) / rounds * 1e3)
    return statistics.median(ours), statistics.median(server)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.blocks")
    parser.add_argument("--mb", type=float, default=2.0, help="block size in MB")
    parser.add_argument("--rounds", type=int, default=40, help="calls per timed batch")
    args = parser.parse_args(argv)
    import_ours()
    from dask_serverless.protocol.keys import new_run_id
    from dask_serverless.protocol.record import OUTPUT, RunSigner
    from dask_serverless.protocol.store import RunStore, client_for
    from dask_serverless.storage.embedded import EmbeddedRedis
    from dask_serverless.storage.serialize import Signer, new_secret

    side = int((args.mb * 2**20 / 8) ** 0.5)
    block = np.random.default_rng(0).random((side, side))
    secret = new_secret()
    with EmbeddedRedis() as server:
        client = client_for(server.url)
        store = RunStore(client, new_run_id(), ttl_s=600)
        store.create(b"record")
        signer = RunSigner(Signer(secret), store.run_id)
        parts = signer.dumps_parts(block, OUTPUT, 1)
        blob = bytes(parts)
        pid = server.process.pid
        stages: list[tuple[str, Callable[[], object]]] = [
            ("sign (pickle out of band, MAC)", lambda: signer.dumps_parts(block, OUTPUT, 1)),
            ("publish (SET + complete script)", lambda: store.complete(1, parts, [(2, 2)], None)),
            ("fetch (MGET)", lambda: store.fetch_outputs([1])),
            ("open (MAC check, unpickle)", lambda: signer.loads(blob, OUTPUT, 1)),
            ("for reference: HMAC-SHA256", lambda: hmac.new(secret, blob, hashlib.sha256).digest()),
            ("for reference: one copy", lambda: bytearray(blob)),
        ]
        rows = [(stage, cpu_ms(action, args.rounds, pid)) for stage, action in stages]
        store.purge(3)
        client.close()
    size_mb = len(blob) / 2**20
    print(f"one {size_mb:.2f} MB block ({side}² float64), CPU ms per block, median of 5 batches")
    print(f"{'stage':34s} {'worker ms':>10s} {'redis ms':>9s} {'GB/s':>6s}")
    for stage, (ours, server_ms) in rows:
        rate = size_mb / 1024 / (ours / 1e3) if ours > 0 else float("inf")
        print(f"{stage:34s} {ours:10.3f} {server_ms:9.3f} {rate:6.2f}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
