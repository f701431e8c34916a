"""Make a local instance's configuration real: a CPU share and a memory limit, as on Lambda.

On AWS Lambda, a function with *m* MB of memory gets ``m / 1769`` vCPU and is killed when
it uses more than *m* MB. The local backend enforces the same with Linux control groups:
every instance gets a cgroup of its own, with

* a CFS quota of ``m / 1769`` CPUs (capped at the machine's cores): ``cpu.cfs_quota_us``
  over ``cpu.cfs_period_us`` on cgroup v1, ``cpu.max`` on v2;
* a memory limit of *m* MB (``memory.limit_in_bytes`` / ``memory.max``, no swap).

The instances' common base group has the CPU weight of one process per core, so the pool
competes for a busy machine like the processes it stands in for (``Cgroups._weigh_base``).

The backend creates ``dask-serverless-<pid>-<token>/`` under its own cgroup (in the
``cpu`` and ``memory`` hierarchies on v1, in the unified one on v2), one child per
instance; the instance moves itself into its child before it serves anything, and the
backend removes the child when the instance is gone. When the kernel kills an instance
for exceeding its memory, the child's ``oom_kill`` counter (``memory.oom_control`` on v1,
``memory.events`` on v2) says so, and the backend reports the task the instance was
running (noted in its ``TaskSlot`` before every task) as that task's failure (the
client retries it one size up, or raises ``protocol.events.TaskOutOfMemoryError``).

Where cgroups cannot be written (not Linux, not root, a read-only hierarchy, a v2
hierarchy without the controllers delegated) the backend runs instances unthrottled, warns
once, and says so (``LocalBackend.throttled``).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from threadpoolctl import threadpool_limits

from dask_serverless.constants import MB_PER_VCPU

# A short period spreads a small share evenly: with 100 ms, a 0.3-CPU instance runs a
# short task at full speed for 30 ms and then stalls for 70, so its slowdown depends on
# where the task falls in the period.
CFS_PERIOD_US = 20_000
_SLOT_BYTES = 512
# A process's default CPU weight: ``cpu.shares`` on cgroup v1, ``cpu.weight`` on v2.
_V1_SHARES = 1024
_V2_WEIGHT = 100
_V2_MAX_WEIGHT = 10_000


def cpu_share(memory_mb: float, cores: float) -> float:
    """vCPUs a configuration gets: one per 1769 MB, at most ``cores``."""
    return min(memory_mb / MB_PER_VCPU, cores)


_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def limit_native_threads(memory_mb: int, cores: float) -> int:
    """Size native thread pools (BLAS, OpenMP) to the vCPUs ``memory_mb`` buys.

    On AWS Lambda a function sees only its vCPUs, so numpy's BLAS starts that many
    threads. A local instance sees the whole machine: with two BLAS threads under a
    one-vCPU quota, a matrix product waits out the quota instead of computing. Pools
    already loaded (numpy is preloaded in the fork server) are resized with
    threadpoolctl; libraries loaded later read the environment. Returns the thread count.
    """
    threads = max(1, int(cpu_share(memory_mb, cores)))
    for name in _THREAD_VARIABLES:
        os.environ[name] = str(threads)
    threadpool_limits(limits=threads)
    return threads


class TaskSlot:
    """Shared memory where an instance notes the task it is running (run, ttl, index, key).

    Written by the instance before every task, read by the backend after the instance
    died. The memory is a memfd: the backend creates it (``TaskSlot()``) and hands its
    descriptor (``fd``) to the instance, which maps the same pages (``TaskSlot(fd)``).
    """

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("dask-serverless-task-slot", os.MFD_CLOEXEC)
            os.ftruncate(fd, _SLOT_BYTES)
        self.fd = fd
        self._memory = mmap.mmap(fd, _SLOT_BYTES)

    def note(self, branch: Any, index: int) -> None:
        # Tab-separated, not JSON: this runs before every task. ``repr`` escapes tabs.
        key = repr(branch.dag.keys[index])[:300]
        text = f"{branch.record.run_id}\t{branch.store.ttl_s}\t{index}\t{key}"
        data = text.encode()[: _SLOT_BYTES - 1] + b"\0"
        self._memory[: len(data)] = data

    def read(self) -> tuple[str, int, int, str] | None:
        try:
            text = self._memory[:].split(b"\0", 1)[0].decode()
            run_id, ttl, index, key = text.split("\t", 3)
            return run_id, int(ttl), int(index), key
        except ValueError:
            return None

    def close(self) -> None:
        self._memory.close()
        os.close(self.fd)


@dataclass(frozen=True)
class InstanceGroup:
    """One instance's cgroup directories (two on v1: cpu and memory; one on v2)."""

    version: int
    directories: tuple[str, ...]
    memory_directory: str

    def enter(self) -> None:
        """Move the calling process (with all its threads) into this group."""
        for directory in self.directories:
            _write(os.path.join(directory, "cgroup.procs"), str(os.getpid()))

    def memory_probe(self) -> GroupPeak | None:
        """A per-task peak-memory probe over this group (cgroup v1, whose peak resets)."""
        if self.version != 1:
            return None
        return GroupPeak(os.path.join(self.memory_directory, "memory.max_usage_in_bytes"))

    def oom_kills(self) -> int:
        """How often the kernel killed a process of this group for lack of memory."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(self.memory_directory, name)) as file:
                for line in file:
                    field, _, value = line.partition(" ")
                    if field == "oom_kill":
                        return int(value)
        except OSError:
            return 0
        return 0


class GroupPeak:
    """Peak memory of an instance's cgroup since the last reset (``worker.metrics``).

    The instance is the group's only process, so between two resets its peak is the
    task's own, interpreter included: what the configuration must hold. The file is
    opened once per instance and rewound for every reset and reading (one ``pwrite``,
    one ``pread``): opening it for each task cost more than a small task.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        return self._fd

    def reset(self) -> None:
        with contextlib.suppress(OSError):
            os.pwrite(self._descriptor(), b"0", 0)

    def peak_mb(self) -> float:
        try:
            return int(os.pread(self._descriptor(), 32, 0)) / 2**20
        except (OSError, ValueError):
            return 0.0


def _write(path: str, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """``(root, mount point, fs type, options)`` of every cgroup mount."""
    mounts = []
    with open("/proc/self/mountinfo") as file:
        for line in file:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if tail and tail[0] in ("cgroup", "cgroup2"):
                options = set(tail[2].split(",")) if len(tail) > 2 else set()
                mounts.append((fields[3], fields[4], tail[0], options))
    return mounts


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and ``""`` → its v2 path."""
    paths = {}
    with open("/proc/self/cgroup") as file:
        for line in file:
            _id, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    return paths


def _join(mount_point: str, root: str, path: str) -> str:
    relative = path[len(root) :] if root != "/" and path.startswith(root) else path
    return os.path.join(mount_point, relative.lstrip("/"))


class Cgroups:
    """The backend's cgroups: a base group under its own, one child per instance."""

    def __init__(self, version: int, bases: dict[str, str], cores: float) -> None:
        self.version = version
        self.bases = bases  # controller ("cpu", "memory"; "" on v2) → base directory
        self.cores = cores
        self._count = 0
        self._weigh_base()

    def _weigh_base(self) -> None:
        """Give the base group the CPU weight of as many processes as the machine has cores.

        The kernel shares a busy machine's CPUs among the groups and processes beside the
        base group, each with the default weight: left at it, all instances together
        would get one process's share, so another program's two busy threads would get
        twice what a two-instance pool gets. On Lambda an instance's vCPUs are its own;
        here the pool competes like the processes it stands in for (one per core, at most
        one per vCPU it can run). Where the weight cannot be written, the default stays.
        """
        cores = max(1, round(self.cores))
        if self.version == 2:
            path = os.path.join(self.bases[""], "cpu.weight")
            weight = min(_V2_MAX_WEIGHT, _V2_WEIGHT * cores)
        else:
            path, weight = os.path.join(self.bases["cpu"], "cpu.shares"), _V1_SHARES * cores
        with contextlib.suppress(OSError):
            _write(path, str(weight))

    @classmethod
    def detect(cls, cores: float | None = None) -> tuple[Cgroups | None, str]:
        """Cgroups this process may write, or ``(None, why not)``."""
        cores = float(cores or os.cpu_count() or 1)
        if not sys.platform.startswith("linux"):
            return None, f"cgroups need Linux (this is {sys.platform})"
        try:
            mounts, paths = _mounts(), _own_paths()
        except OSError as error:
            return None, f"cannot read this process's cgroups: {error}"
        name = f"dask-serverless-{os.getpid()}-{secrets.token_hex(4)}"
        v1: dict[str, str] = {}
        for controller in ("cpu", "memory"):
            for root, point, kind, options in mounts:
                if kind == "cgroup" and controller in options and controller in paths:
                    v1[controller] = os.path.join(_join(point, root, paths[controller]), name)
        try:
            if len(v1) == 2:
                for directory in v1.values():
                    os.mkdir(directory)
                return cls(1, v1, cores), ""
            return cls._detect_v2(mounts, paths, name, cores)
        except OSError as error:
            for directory in v1.values():
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
            return None, f"cannot create cgroups ({error})"

    @classmethod
    def _detect_v2(
        cls,
        mounts: Sequence[tuple[str, str, str, set[str]]],
        paths: dict[str, str],
        name: str,
        cores: float,
    ) -> tuple[Cgroups | None, str]:
        unified = [(root, point) for root, point, kind, _ in mounts if kind == "cgroup2"]
        if not unified or "" not in paths:
            return None, "no cgroup v1 cpu and memory hierarchies and no cgroup v2"
        root, point = unified[0]
        own = _join(point, root, paths[""])
        with open(os.path.join(own, "cgroup.controllers")) as file:
            available = set(file.read().split())
        if not {"cpu", "memory"} <= available:
            return None, "the cgroup v2 hierarchy does not delegate the cpu and memory controllers"
        with open(os.path.join(own, "cgroup.subtree_control")) as file:
            enabled = set(file.read().split())
        if not {"cpu", "memory"} <= enabled:
            _write(os.path.join(own, "cgroup.subtree_control"), "+cpu +memory")
        base = os.path.join(own, name)
        os.mkdir(base)
        try:
            _write(os.path.join(base, "cgroup.subtree_control"), "+cpu +memory")
        except OSError:
            os.rmdir(base)
            raise
        return cls(2, {"": base}, cores), ""

    def create(self, memory_mb: int) -> InstanceGroup:
        """A new group limited to ``memory_mb`` MB and its CPU share."""
        self._count += 1
        leaf = f"i{self._count}-{int(memory_mb)}"
        limit = int(memory_mb) * 2**20
        quota = max(1000, int(cpu_share(memory_mb, self.cores) * CFS_PERIOD_US))
        if self.version == 2:
            directory = os.path.join(self.bases[""], leaf)
            os.mkdir(directory)
            _write(os.path.join(directory, "cpu.max"), f"{quota} {CFS_PERIOD_US}")
            _write(os.path.join(directory, "memory.max"), str(limit))
            with contextlib.suppress(OSError):
                _write(os.path.join(directory, "memory.swap.max"), "0")
            return InstanceGroup(2, (directory,), directory)
        cpu = os.path.join(self.bases["cpu"], leaf)
        memory = os.path.join(self.bases["memory"], leaf)
        os.mkdir(cpu)
        os.mkdir(memory)
        _write(os.path.join(cpu, "cpu.cfs_period_us"), str(CFS_PERIOD_US))
        _write(os.path.join(cpu, "cpu.cfs_quota_us"), str(quota))
        _write(os.path.join(memory, "memory.limit_in_bytes"), str(limit))
        with contextlib.suppress(OSError):
            _write(os.path.join(memory, "memory.memsw.limit_in_bytes"), str(limit))
        return InstanceGroup(1, (cpu, memory), memory)

    @staticmethod
    def remove(group: InstanceGroup) -> None:
        """Remove an instance's group once its process is gone (errors are ignored)."""
        for directory in group.directories:
            with contextlib.suppress(OSError):
                os.rmdir(directory)

    def close(self) -> None:
        for directory in self.bases.values():
            with contextlib.suppress(OSError):
                os.rmdir(directory)
