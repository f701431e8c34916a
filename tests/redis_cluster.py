"""A private Redis Cluster for tests and benchmarks: 3 masters and 3 replicas on 127.0.0.1.

Six ``redis-server --cluster-enabled yes`` processes on free ports, in one temporary
directory, joined by ``redis-cli --cluster create … --cluster-replicas 1``. A short
``cluster-node-timeout`` lets a replica take over a killed master within seconds, which
the failover tests rely on. ``stop()`` ends the six processes and removes the directory.

``python -m tests.redis_cluster`` starts one and prints its URL until interrupted (Ctrl-C
or SIGTERM), for ``python -m benchmarks --redis URL``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time

import redis

from dask_serverless.storage.embedded import find_redis_server, free_port

MASTERS = 3
# Milliseconds before a silent master counts as failed and a replica is promoted.
NODE_TIMEOUT_MS = 1000
_START_TIMEOUT_S = 30.0


class LocalRedisCluster:
    """Six redis-server processes forming one cluster; ``url`` names one master."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="dsl-cluster-")
        self.ports: list[int] = []
        self.processes: dict[int, subprocess.Popen] = {}
        self.server = find_redis_server()
        try:
            for _ in range(2 * MASTERS):
                port = self._unused_port()
                self.ports.append(port)
                self._start_node(port)
            self._create()
            self._wait_until_ok()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def _unused_port(self) -> int:
        while True:
            port = free_port()
            # The cluster bus listens on port + 10000.
            if port not in self.ports and port + 10000 < 65536:
                return port

    def _start_node(self, port: int) -> None:
        folder = os.path.join(self.directory, str(port))
        os.makedirs(folder, exist_ok=True)
        args = [self.server, "--port", str(port), "--bind", "127.0.0.1", "--dir", folder]
        args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--save", "", "--appendonly"]
        args += ["no", "--protected-mode", "no"]
        self.processes[port] = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _START_TIMEOUT_S
        node = redis.Redis(port=port)
        while True:
            try:
                node.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
            finally:
                node.close()

    def _create(self) -> None:
        redis_cli = shutil.which("redis-cli") or "redis-cli"
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            [redis_cli, "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=_START_TIMEOUT_S,
        )

    def _wait_until_ok(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        for port in self.ports:
            node = redis.Redis(port=port)
            try:
                while node.cluster("info").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"cluster node {port} never became ready")
                    time.sleep(0.1)
            finally:
                node.close()
        # Every node must also know every replica, or a failover has nobody to promote.
        while len(self.masters()) != MASTERS or self._replica_count() != MASTERS:
            if time.monotonic() > deadline:
                raise TimeoutError("cluster replicas never attached")
            time.sleep(0.1)

    def masters(self) -> list[int]:
        """Ports of the live masters that own slots, as the cluster sees them now."""
        found = []
        for port in self.live_ports():
            node = redis.Redis(port=port, decode_responses=True)
            try:
                info = node.info("replication")
            except redis.ConnectionError:
                continue
            finally:
                node.close()
            if info.get("role") == "master" and self._owns_slots(port):
                found.append(port)
        return found

    def _owns_slots(self, port: int) -> bool:
        node = redis.Redis(port=port)
        try:
            slots = node.execute_command("CLUSTER SLOTS")
        finally:
            node.close()
        # Each entry: first slot, last slot, [host, port, id] of the master, replicas…
        return any(int(entry[2][1]) == port for entry in slots)

    def _replica_count(self) -> int:
        count = 0
        for port in self.live_ports():
            node = redis.Redis(port=port, decode_responses=True)
            try:
                info = node.info("replication")
            except redis.ConnectionError:
                continue
            finally:
                node.close()
            if info.get("role") == "slave" and info.get("master_link_status") == "up":
                count += 1
        return count

    def live_ports(self) -> list[int]:
        return [p for p, process in self.processes.items() if process.poll() is None]

    def kill(self, port: int) -> None:
        """SIGKILL one node: what a crashed machine looks like to the cluster."""
        process = self.processes[port]
        process.kill()
        process.wait()

    def restart(self, port: int) -> None:
        """Start a killed node again: with its ``nodes.conf`` it rejoins as a replica."""
        self._start_node(port)

    def wait_until_whole(self, timeout_s: float = 30.0) -> None:
        """Until 3 masters serve every slot and each has a replica again."""
        deadline = time.monotonic() + timeout_s
        while True:
            masters = self.masters()
            if (
                len(masters) == MASTERS
                and all(self._state_ok(p) for p in self.live_ports())
                and self._replica_count() == MASTERS
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not whole again: masters {masters}")
            time.sleep(0.1)

    def _state_ok(self, port: int) -> bool:
        node = redis.Redis(port=port)
        try:
            return node.cluster("info").get("cluster_state") == "ok"
        finally:
            node.close()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalRedisCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # A background job ignores SIGINT: SIGTERM stops the cluster cleanly too.
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    with LocalRedisCluster() as cluster:
        print(cluster.url, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
