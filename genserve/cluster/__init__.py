"""Scale-out: many GenServe nodes sharing one Redis (``cluster.backend: redis``; see the README's "Running several
machines").

Building blocks on Redis:
- ``redis_queue``: the global priority queue, claimed by nodes through leases (``RedisJobQueue``).
- ``redis_records``: job records (``RedisJobRecords``, answering as the SQLite store does) and job events on
  per-job streams (``RedisJobEvents``), so any node can answer for any job.
- ``store``: a node's result store: records in Redis, images in a shared folder or in Redis (``results.backend``).
- ``directory``: which worker nodes are alive and what their pools look like.

The two sides of a job:
- ``dispatcher`` (API node): the supervisor's methods over the cluster (``ClusterDispatcher``); ``payload`` packs a
  job for the queue; ``mirror`` keeps a live ``Job`` per followed job, moved by its events.
- ``node`` (worker node): a local supervisor fed from the queue (``WorkerNode``); ``ledger`` writes what happens to
  jobs into Redis, and its ``Janitor`` re-queues the jobs of nodes that vanished.

``wiring`` builds one node's parts from the configuration. The single-machine service uses none of this.
"""
