"""Scale-out: many GenServe nodes sharing one Redis.

- ``redis_queue``: the global priority queue, claimed by nodes through leases (``RedisJobQueue``).
- ``redis_records``: job records (``RedisJobRecords``, answering as the SQLite store does) and job events on
  per-job streams (``RedisJobEvents``, ``AsyncRedisJobEvents``), so any node can answer for any job.

These are the cluster's building blocks; the single-machine service (genserve.queue, genserve.store) does not use
them, and the ``cluster.backend: redis`` wiring that will is not in place yet.
"""
