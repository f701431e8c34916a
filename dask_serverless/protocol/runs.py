"""The run history: the newest runs and their reports, kept in Redis under the history prefix.

Every run's report (``report.RunReport``, planned next to actual) outlives the run so that
``dask-serverless runs``/``report`` and the dashboard can show past runs. Like the
planner's samples (``protocol.history``) it is *bounded*, whatever the number of runs:

==============================  =======================================================
``H {runs}``                    sorted set: run id → start (Unix s); only the newest
                                ``keep`` runs (``serverless.history.runs``) stay in it
``H {runs}:summaries``          hash: run id → one-line JSON summary (state, tasks,
                                planner, SLA, makespans, cost) for listing runs cheaply
``H {runs}:run:<run-id>``       the run's report: zlib-compressed ``RunReport.to_json``;
                                written when the run starts (state ``running``, no
                                actual times: this is how a dashboard finds the tasks
                                of a run in progress) and again when it ends
==============================  =======================================================

(``H = dsl:history:v2:``, named in ``protocol.keys``.) Adding a run drops the reports of
runs that fell out of the newest ``keep``; every report also carries the history TTL
(``planning.history-ttl``), so nothing is kept longer than that even if nobody runs
again. Only the client writes here,
once at a run's start and once at its end; workers never do. Nothing here scans the
keyspace: the sorted set is the index.

A run still in progress is followed through its own event stream (``RunStore``), which
the workers write anyway: watching a run adds no work for them.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, cast

import redis

from dask_serverless.protocol.keys import RUN_SUMMARIES_KEY as SUMMARIES_KEY
from dask_serverless.protocol.keys import RUNS_HISTORY_KEY as RUNS_KEY
from dask_serverless.protocol.keys import run_report_key as report_key


class RunHistory:
    """Reads and writes the newest ``keep`` runs' reports (see module docstring)."""

    def __init__(
        self, client: redis.Redis | redis.RedisCluster, keep: int = 100, ttl_s: int = 30 * 86400
    ) -> None:
        if keep < 1:
            raise ValueError(f"run history must keep at least 1 run, got {keep}")
        self.client = client
        self.keep = int(keep)
        self.ttl_s = int(ttl_s)

    def save(self, run_id: str, started_unix: float, summary_json: str, report_json: str) -> None:
        """Store a run's report and index it; drop the reports of runs beyond ``keep``."""
        blob = zlib.compress(report_json.encode(), 3)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.set(report_key(run_id), blob, ex=self.ttl_s)
            pipe.hset(SUMMARIES_KEY, run_id, summary_json)
            pipe.zadd(RUNS_KEY, {run_id: started_unix})
            pipe.zrange(RUNS_KEY, 0, -(self.keep + 1))
            pipe.zremrangebyrank(RUNS_KEY, 0, -(self.keep + 1))
            pipe.expire(RUNS_KEY, self.ttl_s)
            pipe.expire(SUMMARIES_KEY, self.ttl_s)
            replies = pipe.execute()
        dropped = [r.decode() for r in replies[3]]
        if dropped:
            with self.client.pipeline(transaction=False) as pipe:
                for run_id_dropped in dropped:  # one key per UNLINK: a cluster pipeline's rule
                    pipe.unlink(report_key(run_id_dropped))
                pipe.hdel(SUMMARIES_KEY, *dropped)
                pipe.execute()

    def recent(self, count: int) -> list[tuple[str, float]]:
        """The newest ``count`` runs as ``(run id, start Unix s)``, newest first."""
        entries: Any = self.client.zrevrange(RUNS_KEY, 0, max(count, 1) - 1, withscores=True)
        return [(run_id.decode(), float(started)) for run_id, started in entries]

    def summaries(self, run_ids: Sequence[str]) -> list[str | None]:
        """The summaries' JSON of ``run_ids`` (None where gone); one round trip."""
        if not run_ids:
            return []
        values = cast("list[bytes | None]", self.client.hmget(SUMMARIES_KEY, list(run_ids)))
        return [None if v is None else v.decode() for v in values]

    def load(self, run_ids: Sequence[str]) -> list[str | None]:
        """The reports' JSON of ``run_ids`` (None where gone); one round trip."""
        if not run_ids:
            return []
        blobs = cast("list[bytes | None]", self.client.mget([report_key(r) for r in run_ids]))
        return [None if b is None else zlib.decompress(b).decode() for b in blobs]
