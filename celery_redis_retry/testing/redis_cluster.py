"""A Redis Cluster of redis-server processes on 127.0.0.1, with replicas if asked, and real failovers.

A failover here is the cluster's own: :meth:`RedisCluster.kill_master` SIGKILLs a master
and waits until the surviving masters have voted its replica in (no Sentinel, no
``redis-cli``); :meth:`RedisCluster.failover` has a replica take over gracefully with
``CLUSTER FAILOVER``; :meth:`RedisCluster.restart_killed` brings a killed master back,
and it rejoins as a replica of the one that replaced it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from celery_redis_retry.errors import HarnessError
from celery_redis_retry.testing.processes import _StartedGroup, quiet_port, wait_until
from celery_redis_retry.testing.redis_servers import RedisServer

if TYPE_CHECKING:
    from typing_extensions import Self

#: A node that has not heard from another for this long counts it as failing: small, so
#: a failover takes a few seconds.
NODE_TIMEOUT_MS = 2000


def _free_cluster_port() -> int:
    # A cluster node also listens on port + 10000 (its cluster bus): both must be free,
    # and below the ephemeral ports (see quiet_port).
    return quiet_port(room=10000)


#: How ``node`` sees the slots: ``(first slot, last slot, master port, replica ports)`` per range.
_View = list[tuple[int, int, int, tuple[int, ...]]]


def _view(node: RedisServer) -> _View | None:
    """``node``'s view of the slots when it reports ``cluster_state:ok``; None while it does not (or is silent)."""
    try:
        with node.quick_client() as client:
            if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                return None
            ranges = client.execute_command("CLUSTER", "SLOTS")
    except redis.RedisError:
        return None
    return [
        (int(first), int(last), int(master[1]), tuple(int(replica[1]) for replica in replicas))
        for first, last, master, *replicas in ranges
    ]


def _serving(view: _View, slot: int) -> tuple[int, tuple[int, ...]]:
    """The master port and replica ports of ``slot`` in ``view``; ``(0, ())`` if no node serves it."""
    return next(((master, replicas) for first, last, master, replicas in view if first <= slot <= last), (0, ()))


class RedisCluster(_StartedGroup):
    """A Redis Cluster of ``masters`` redis-server processes on 127.0.0.1, each with ``replicas`` replicas.

    Slots are spread evenly with CLUSTER ADDSLOTS, the nodes introduced with CLUSTER MEET
    and each replica attached with CLUSTER REPLICATE, so no ``redis-cli --cluster`` is
    needed. :attr:`nodes` lists the masters first, then the replicas (replica ``k``
    started as the replica of master ``k % masters``); the roles change with a failover.
    :attr:`url` is a ``redis+cluster://`` target URL; :meth:`client` a redis-py
    ``RedisCluster``. ``binary`` is passed to every :class:`RedisServer` (a Valkey
    cluster with :func:`valkey_server_binary`).

    With replicas, nodes wait :data:`NODE_TIMEOUT_MS` before they count a silent node as
    failing, and a replica may always be promoted however long it was cut off from its
    master (``cluster-replica-validity-factor 0``): :meth:`kill_master` takes a few
    seconds.
    """

    SLOTS = 16384

    def __init__(
        self, masters: int = 3, *, replicas: int = 0, dir: str | None = None,  # noqa: A002
        binary: str | None = None,
    ) -> None:
        if masters < 1 or replicas < 0:
            raise HarnessError(f"a cluster needs masters >= 1 and replicas >= 0, not {masters=} {replicas=}")
        self.masters = masters
        self.replicas = replicas
        self.dir = dir or tempfile.mkdtemp(prefix="crr-cluster-")
        args = ["--cluster-enabled", "yes", "--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
        if replicas:
            # A replica may be promoted however long it was cut off from its master; a full
            # sync starts at once instead of waiting 5 s for more replicas to share it; and a
            # master pings its replicas every second, not 10: CLUSTER SLOTS leaves out a
            # replica whose replication offset is still 0, and an idle master's pings are
            # what moves it.
            args += ["--cluster-replica-validity-factor", "0", "--repl-diskless-sync-delay", "0",
                     "--repl-ping-replica-period", "1"]
        self.nodes = [
            RedisServer(
                _free_cluster_port(), args=(*args, "--cluster-config-file", f"nodes-{i}.conf"),
                dir=str(Path(self.dir) / f"node-{i}"), binary=binary,
            )
            for i in range(masters * (1 + replicas))
        ]
        #: Masters SIGKILLed by :meth:`kill_master` and not restarted yet.
        self.killed: list[RedisServer] = []
        #: Seconds the last :meth:`kill_master` or :meth:`failover` took, until the cluster was whole again.
        self.failover_seconds: float | None = None

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:PORT`` of the first running node (the others are discovered)."""
        return f"redis+cluster://127.0.0.1:{self._entry_node().port}"

    def start(self, timeout: float = 30.0) -> Self:
        """Start every node, assign the slots, join the nodes, attach the replicas.

        Returns once every node reports ``cluster_state:ok`` and knows every other node,
        and every replica is in sync with its master (``master_link_status:up``).
        """
        for node in self.nodes:
            Path(node.dir).mkdir(parents=True, exist_ok=True)
            node.start()
        share = self.SLOTS // self.masters
        for i, node in enumerate(self.nodes[: self.masters]):
            last = self.SLOTS if i == self.masters - 1 else (i + 1) * share
            with node.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTS", *range(i * share, last))
                for other in self.nodes[1:]:
                    client.execute_command("CLUSTER", "MEET", "127.0.0.1", other.port)
        for k, replica in enumerate(self.nodes[self.masters :]):
            self._attach(replica, self.nodes[k % self.masters], timeout)

        def ready() -> bool:
            for node in self.nodes:
                with node.client() as client:
                    info = bytes(client.execute_command("CLUSTER", "INFO")).decode()
                    if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(self.nodes)}" not in info:
                        return False
            return all(self._following(replica) for replica in self.nodes[self.masters :]) and self._agreed(
                lambda view: all(len(replicas) == self.replicas for *_, replicas in view))

        wait_until(ready, timeout, interval=0.2, what="the cluster to report cluster_state:ok")
        return self

    def client(self, **kwargs: Any) -> Any:
        """A redis-py ``RedisCluster`` client of the first running node (close it when done)."""
        from redis.cluster import RedisCluster as ClusterClient

        return ClusterClient(host="127.0.0.1", port=self._entry_node().port, **kwargs)

    def master_of(self, slot: int = 0) -> RedisServer:
        """The node that is the master of ``slot`` now, as the first running node sees it."""
        if not 0 <= slot < self.SLOTS:
            raise HarnessError(f"slot must be in 0..{self.SLOTS - 1}, not {slot!r}")
        view = wait_until(lambda: _view(self._entry_node()), 10.0, interval=0.1,
                          what=f"{self._entry_node().name} to report cluster_state:ok")
        return self._node_at(_serving(view, slot)[0])

    def replica_of(self, master: RedisServer) -> RedisServer:
        """A running replica of ``master`` (the first in :attr:`nodes`).

        :raises HarnessError: if ``master`` has none.
        """
        for node in self._running():
            replication = node.replication()
            if replication and replication.get("role") == "slave" and replication.get("master_port") == master.port:
                return node
        raise HarnessError(f"{master.name} has no running replica (RedisCluster(replicas=...) gives each master some)")

    def kill_master(self, slot: int = 0, timeout: float = 30.0) -> RedisServer:
        """SIGKILL the master of ``slot`` (slot 0's by default) and return the replica that replaced it.

        Returns once the cluster has promoted the replica on its own and every running
        node reports ``cluster_state:ok`` and names it the master of ``slot``. The killed
        node goes to :attr:`killed`; :meth:`restart_killed` brings it back.

        :raises HarnessError: if the master has no replica to promote.
        :raises HarnessTimeoutError: if the failover is not over within ``timeout`` seconds.
        """
        old = self.master_of(slot)
        heir = self.replica_of(old)
        began = time.monotonic()
        old.kill()
        self.killed.append(old)
        self._await_master(heir, slot, timeout, f"{heir.name} to replace the killed {old.name}")
        self.failover_seconds = time.monotonic() - began
        return heir

    def failover(self, slot: int = 0, timeout: float = 30.0) -> RedisServer:
        """Have the replica of ``slot``'s master take over with ``CLUSTER FAILOVER``; return it.

        The graceful, manual failover an operator runs: the master stops taking writes
        until its replica has caught up, then the two swap roles. Returns once the old
        master is a replica in sync with the new one and every running node names the
        new one the master of ``slot``.
        """
        old = self.master_of(slot)
        heir = self.replica_of(old)
        began = time.monotonic()
        with heir.client() as client:
            client.execute_command("CLUSTER", "FAILOVER")
        self._await_master(heir, slot, timeout, f"{heir.name} to take over from {old.name}")
        self._await_following(old, heir, timeout)
        self.failover_seconds = time.monotonic() - began
        return heir

    def restart_killed(self, timeout: float = 30.0) -> list[RedisServer]:
        """Start the masters :meth:`kill_master` killed again; return them once each is a replica in sync.

        A node keeps its ``nodes-N.conf``, so it comes back knowing the cluster, learns it
        was replaced and follows the master that replaced it.
        """
        restarted = []
        while self.killed:
            restarted.append(self._rejoin(self.killed.pop(0), timeout))
        return restarted

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    def _rejoin(self, node: RedisServer, timeout: float) -> RedisServer:
        node.start()
        self._await_following(node, None, timeout)
        # Every node lists it among the replicas again (CLUSTER SLOTS, what clients read).
        wait_until(lambda: self._agreed(lambda view: any(node.port in replicas for *_, replicas in view)),
                   timeout, interval=0.1, what=f"every node to see {node.name} as a replica")
        return node

    def _attach(self, replica: RedisServer, master: RedisServer, timeout: float) -> None:
        """CLUSTER REPLICATE, once the replica has heard of its master (it refuses an unknown node)."""
        with master.client() as client:
            master_id = bytes(client.execute_command("CLUSTER", "MYID")).decode()
        wait_until(lambda: self._knows(replica, master_id), timeout, interval=0.1,
                   what=f"{replica.name} to hear of {master.name}")
        with replica.client() as client:
            client.execute_command("CLUSTER", "REPLICATE", master_id)

    @staticmethod
    def _knows(node: RedisServer, node_id: str) -> bool:
        with node.quick_client() as client:
            return node_id in str(client.execute_command("CLUSTER", "NODES"))

    def _following(self, replica: RedisServer, master: RedisServer | None = None) -> bool:
        """Whether ``replica`` is a replica in sync (with ``master``, if given)."""
        replication = replica.replication()
        return bool(
            replication and replication.get("role") == "slave" and replication.get("master_link_status") == "up"
            and (master is None or replication.get("master_port") == master.port)
        )

    def _await_following(self, replica: RedisServer, master: RedisServer | None, timeout: float) -> None:
        wait_until(lambda: self._following(replica, master), timeout, interval=0.1,
                   what=f"{replica.name} to be a replica in sync" + (f" with {master.name}" if master else ""))

    def _await_master(self, heir: RedisServer, slot: int, timeout: float, what: str) -> None:
        def promoted() -> bool:
            replication = heir.replication()
            return bool(replication and replication.get("role") == "master") and self._agreed(
                lambda view: _serving(view, slot)[0] == heir.port)

        wait_until(promoted, timeout, interval=0.1, what=what)

    def _agreed(self, holds: Callable[[_View], bool]) -> bool:
        """Whether every running node reports ``cluster_state:ok`` and a view of the slots where ``holds``."""
        views = [_view(node) for node in self._running()]
        return all(view is not None and holds(view) for view in views)

    def _running(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.running]

    def _entry_node(self) -> RedisServer:
        return next(iter(self._running()), self.nodes[0])

    def _node_at(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)
