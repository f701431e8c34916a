"""Load: 4 client processes × 10 concurrent computes of mixed graphs against one Redis."""

from __future__ import annotations

import subprocess
import sys


def test_four_clients_times_ten_concurrent_computes(redis_url, redis_client):
    clients = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.load_client", redis_url, str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(4)
    ]
    for client in clients:
        out, err = client.communicate(timeout=600)
        assert client.returncode == 0, err[-3000:]
        assert out.strip() == "ok 10", (out, err[-3000:])
