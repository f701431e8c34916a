"""Platform facts and protocol numbers, each in one place with where its value comes from.

Tunable settings (timeouts, retries, sizes a user may change) live in ``serverless.yaml``
and ``config.py``; what is here is either a fact about the platform we model or a ratio
that the client and the workers must agree on.
"""

from __future__ import annotations

# AWS Lambda allocates CPU in proportion to memory: a function gets one full vCPU at
# 1769 MB ("Lambda memory and computing power", AWS Lambda developer guide). The planner's
# speed model and the local backend's CPU quota both use it.
MB_PER_VCPU = 1769

# The memory configurations (MB) a task may get by default: Lambda's classic 512 MB and
# 1 GB, one full vCPU (1769 MB), and 3008 MB (the largest size before the 2020 10 GB raise,
# still the default maximum of many accounts). Mirrors ``planning.memory-configs`` and
# ``lambda.memory-sizes`` in serverless.yaml.
MEMORY_SIZES_MB: tuple[int, ...] = (512, 1024, 1769, 3008)

# The configuration of an invocation that asks for none: one vCPU.
DEFAULT_MEMORY_MB = MB_PER_VCPU

# The memory sizes AWS Lambda accepts for a function (developer guide, "Configuring
# function memory").
LAMBDA_MIN_MEMORY_MB = 128
LAMBDA_MAX_MEMORY_MB = 10240

# AWS Lambda stops an invocation at its timeout, 15 minutes at most; the local platform
# gives its invocations the same limit.
INVOCATION_TIMEOUT_MS = 900_000

# A lease that no payload names lasts ``serverless.lease-timeout`` (5 s in serverless.yaml).
DEFAULT_LEASE_MS = 5000

# A worker renews its lease every third of the lease, so one missed beat does not lapse it.
HEARTBEATS_PER_LEASE = 3

# The client looks for lapsed leases every half lease: a dead worker's work is re-invoked
# at most one and a half leases after its last renewal.
WATCHES_PER_LEASE = 2
# Leases a cancelled run's task that waits for a nested run gets before its instance is
# ended: a heartbeat (a third of a lease) sees the parent run gone, the nested run's client
# notices at its next watch (half a lease) and deletes the nested run's keys.
NESTED_CANCEL_LEASES = 2

# Arguments at least this long are sent to Redis as they are rather than copied into one
# command buffer (hiredis copies; redis-py's own packer does not): measured, a 2 MB output
# costs a copy that small commands do not notice.
LARGE_ARGUMENT_BYTES = 64 * 1024

# A run with no live lease, nothing queued and no progress for this many leases cannot
# finish (a lost fan-in inbox, evicted keys): the client fails it, naming what is stuck.
STUCK_LEASES = 2

# Every Redis call of the client and the workers gives up after this many seconds, so a
# Redis that hangs (SIGSTOP, a saturated network) cannot hold a compute past its timeout by
# more than this. Blocking reads wait at most a second, well below it.
REDIS_SOCKET_TIMEOUT_S = 5.0

# A waiting client refreshes its run's keys this many times per ``serverless.run-ttl``, so
# that a late refresh or two never lets a live run's key expire.
KEEP_ALIVES_PER_TTL = 4

# Literals in a graph (persisted chunks) at least this large leave the run record and are
# stored once per run under their own key, read only by the worker that runs their node:
# the same size from which an argument is worth sending without a copy, since below it a
# value costs less inside the record than a round trip of its own.
LARGE_LITERAL_BYTES = LARGE_ARGUMENT_BYTES

# The worker id prefix of the invocations a client runs itself (tasks placed beside the
# literal data they read, ``planning.locality``): run reports name it as their instance.
CLIENT_WORKER = "client"
