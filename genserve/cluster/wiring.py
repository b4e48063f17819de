"""One node's connections to its cluster, built from ``cluster:`` in the configuration (cluster.backend redis).

Each part gets a client of its own, so a blocking read (a claim, the event follower, the cancel subscription)
never holds a connection another part waits for; all of them use the short timeouts of
``redis_queue.client_options``, so a Redis that is down shows as a clear 503 within seconds.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.retry import Retry

from genserve.cluster.directory import NodeDirectory
from genserve.cluster.ledger import Janitor, Ledger
from genserve.cluster.mirror import EventFollower
from genserve.cluster.redis_queue import RedisJobQueue, client_options, retry_backoff
from genserve.cluster.redis_records import RedisJobEvents, RedisJobRecords
from genserve.cluster.store import ClusterStore, RedisImages
from genserve.config import Config, expand_path

log = logging.getLogger(__name__)


def node_name(config: Config) -> str:
    """cluster.node_id, else host name and process id: unique on a machine, recognisable in /status."""
    return config.cluster.node_id or f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class ClusterParts:
    node_id: str
    queue: RedisJobQueue
    records: RedisJobRecords
    events: RedisJobEvents
    directory: NodeDirectory
    ledger: Ledger
    store: ClusterStore
    janitor: Janitor
    follower_client: redis.Redis  # the API side's blocking event reader

    @classmethod
    def connect(cls, config: Config) -> ClusterParts:
        """Clients only: nothing is sent to Redis until a part is used, so a node starts while Redis is down."""
        cluster = config.cluster
        node_id = node_name(config)
        timeout = cluster.socket_timeout_s
        prefix = cluster.prefix
        ttl_s = config.results.max_age_hours * 3600

        def client() -> redis.Redis:
            return redis.Redis.from_url(
                cluster.redis_url, retry=Retry(retry_backoff(), retries=2), **client_options(timeout)
            )

        block_s = max(0.05, timeout - 1.0)  # a blocked read must return before its socket times out
        queue = RedisJobQueue(client(), prefix=prefix, max_size=config.queue.max_size, max_block_s=block_s)
        records = RedisJobRecords(client(), prefix=prefix)
        events = RedisJobEvents(client(), prefix=prefix, ttl_s=ttl_s, max_block_s=block_s)
        images = RedisImages(client(), prefix=prefix, ttl_s=ttl_s) if config.results.backend == "redis" else None
        root = expand_path(config.results.dir)
        store = ClusterStore(root, records, images, inputs_root=root / "inputs" / _safe(node_id))
        directory = NodeDirectory(client(), prefix=prefix, stale_s=max(3 * cluster.node_report_s, cluster.lease_s))
        ledger = Ledger(records, events, node_id)
        return cls(
            node_id=node_id,
            queue=queue,
            records=records,
            events=events,
            directory=directory,
            ledger=ledger,
            store=store,
            janitor=Janitor(queue, ledger, cluster.lease_s),
            follower_client=client(),
        )

    def follower(self) -> EventFollower:
        nudge_key = f"{self.queue.prefix}nudge:{self.node_id}"
        return EventFollower(self.events, self.follower_client, nudge_key, self.store.local_image)

    def close(self) -> None:
        self.store.close()  # records and images
        for part in (self.queue, self.events, self.directory):
            part.close()
        self.follower_client.close()


def _safe(node_id: str) -> Path:
    return Path(node_id.replace("/", "_"))
