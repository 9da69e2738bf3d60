"""``redis_retry_targets`` URLs: parsed in one place for the settings check, the replay
connection (:func:`celery_redis_retry.redis_exec.connect`) and ``wrap()``'s check that a
client talks to its target's server.

Forms: ``redis://HOST[:PORT][/DB]``, ``rediss://...``, ``unix:///PATH[?db=N]``,
``redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`` (and ``rediss+sentinel``),
``redis+cluster://HOST[:PORT]`` (any node; the others are discovered; ``rediss+cluster``).
Host names are compared as written (``localhost`` and ``127.0.0.1`` count as the same
host); no DNS name is resolved.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

from redis.connection import parse_url

TARGET_SCHEMES = frozenset(
    ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")
)
_LOOPBACK = frozenset(("localhost", "127.0.0.1", "::1"))


class TargetURLError(ValueError):
    """A target URL that no client could connect with; the message says what is wrong."""


def normal_host(host: str) -> str:
    """``host`` as compared between URLs and clients: lower case, every loopback name as ``127.0.0.1``."""
    host = host.lower().strip("[]")
    return "127.0.0.1" if host in _LOOPBACK else host


@dataclass(frozen=True)
class TargetAddress:
    """Where a target URL (or a client) sends its commands.

    ``kind`` is ``server`` (one host and port), ``unix`` (a socket path), ``sentinel``
    (the master Sentinels name as ``service``; ``nodes`` are the Sentinels) or
    ``cluster`` (``nodes`` are the known nodes). Hosts are kept as written and compared
    with :func:`normal_host`.
    """

    kind: str
    nodes: tuple[tuple[str, int], ...] = ()
    db: int = 0
    path: str = ""
    service: str = ""

    def describe(self) -> str:
        """``127.0.0.1:6379 db 0``, ``unix socket /tmp/r.sock db 0``, ``Sentinel service mymaster``..."""
        nodes = ",".join(f"{host}:{port}" for host, port in self.nodes)
        if self.kind == "unix":
            return f"unix socket {self.path} db {self.db}"
        if self.kind == "sentinel":
            return f"Sentinel service {self.service!r} db {self.db}"
        if self.kind == "cluster":
            return f"Redis Cluster of {nodes}"
        return f"{nodes} db {self.db}"

    def mismatch(self, other: TargetAddress) -> bool:
        """Whether ``other`` (a client's address) is not this target's server."""
        if self.kind != other.kind:
            return True
        if self.kind == "cluster":
            return not self.normal_nodes & other.normal_nodes  # one cluster knows all its nodes
        if self.kind == "sentinel":
            return (self.service, self.db) != (other.service, other.db)
        if self.kind == "unix":
            return (os.path.normpath(self.path), self.db) != (os.path.normpath(other.path), other.db)
        return (self.normal_nodes, self.db) != (other.normal_nodes, other.db)

    @property
    def normal_nodes(self) -> frozenset[tuple[str, int]]:
        """The nodes with their hosts normalized (:func:`normal_host`)."""
        return frozenset((normal_host(host), port) for host, port in self.nodes)


def parse_target_url(url: str) -> TargetAddress:
    """Check ``url`` fully and say where it points.

    :raises TargetURLError: naming the problem (no host, bad port, db not a number,
        Sentinel URL without a service name, cluster URL without a node...).
    """
    if not isinstance(url, str):
        raise TargetURLError(f"must be a URL string, got {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in TARGET_SCHEMES:
        raise TargetURLError(f"must be a Redis URL ({', '.join(sorted(TARGET_SCHEMES))}://...)")
    if not url[len(parts.scheme):].startswith("://"):
        raise TargetURLError(f"must start with {parts.scheme}:// (two slashes)")
    if parts.scheme.endswith("+sentinel"):
        return _sentinel(parts)
    if parts.scheme.endswith("+cluster"):
        return _cluster(parts)
    try:
        # redis-py's own parser: what it accepts here is what the clients will get.
        options = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise TargetURLError(str(exc)) from None
    if parts.scheme == "unix":
        if not options.get("path"):
            raise TargetURLError("has no socket path (write unix:///path/to/redis.sock)")
        return TargetAddress("unix", db=_db("", options), path=options["path"])
    if not parts.netloc or not parts.hostname:
        raise TargetURLError(f"has no host (write {parts.scheme}://HOST:PORT/DB)")
    if "," in parts.netloc:
        raise TargetURLError(f"names several hosts: only {parts.scheme}+cluster:// and +sentinel:// URLs may")
    return TargetAddress("server", _nodes(parts, default_port=6379, what="the server"), db=_db(parts.path, options))


def _db(path: str, options: dict[str, Any]) -> int:
    db = path.strip("/")
    if db and not db.isdigit():
        raise TargetURLError(f"database {db!r} must be a number (the path is /DB)")
    return int(options.get("db", db or 0))


def _nodes(parts: SplitResult, *, default_port: int | None, what: str) -> tuple[tuple[str, int], ...]:
    """The ``HOST[:PORT]`` list of a URL's netloc (after any ``user:password@``)."""
    form = "HOST:PORT" if default_port is None else "HOST[:PORT]"
    nodes = []
    for node in parts.netloc.rpartition("@")[2].split(","):
        host, colon, port = node.rpartition(":")
        if not colon or host.endswith("[") or node.endswith("]"):  # no port, or a bare [IPv6]
            host, port = node, ""
        if not host or not (port or default_port) or (port and not (port.isdigit() and 0 < int(port) < 65536)):
            raise TargetURLError(f"{what} {node!r} must be {form} with PORT a number from 1 to 65535")
        nodes.append((host.strip("[]").lower(), int(port or default_port or 0)))
    return tuple(nodes)


def _cluster(parts: SplitResult) -> TargetAddress:
    if not parts.netloc.rpartition("@")[2]:
        raise TargetURLError(f"names no node (write {parts.scheme}://HOST:PORT[,HOST:PORT...])")
    nodes = _nodes(parts, default_port=6379, what="cluster node")
    db = _db(parts.path, {})
    if db != 0:
        raise TargetURLError(f"names database {db}: a Redis Cluster has only database 0")
    return TargetAddress("cluster", nodes)


def _sentinel(parts: SplitResult) -> TargetAddress:
    if not parts.netloc.rpartition("@")[2]:
        raise TargetURLError(f"names no Sentinel (write {parts.scheme}://HOST:PORT/SERVICE/DB)")
    nodes = _nodes(parts, default_port=None, what="Sentinel")
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise TargetURLError(f"names no service (write {parts.scheme}://HOST:PORT/SERVICE/DB)")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise TargetURLError(f"path {parts.path!r} must be /SERVICE or /SERVICE/DB with DB a number")
    return TargetAddress("sentinel", nodes, db=int(path[1]) if len(path) == 2 else 0, service=path[0])


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or not parts.password:
        return str(url)
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def client_address(client: Any) -> TargetAddress | None:
    """Where a redis-py client sends its commands; None for an object this cannot tell."""
    manager = getattr(client, "nodes_manager", None)
    if manager is not None:  # RedisCluster: its startup nodes and those it discovered
        names = [*getattr(manager, "startup_nodes", {}).values(), *getattr(manager, "nodes_cache", {}).values()]
        nodes = {(str(n.host), int(n.port)) for n in names}
        return TargetAddress("cluster", tuple(sorted(nodes)))
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        return None
    db = int(kwargs.get("db") or 0)
    service = getattr(pool, "service_name", None)
    if service is not None:
        return TargetAddress("sentinel", db=db, service=str(service))
    if kwargs.get("path"):
        return TargetAddress("unix", db=db, path=str(kwargs["path"]))
    return TargetAddress("server", ((str(kwargs.get("host", "localhost")), int(kwargs.get("port", 6379))),), db=db)
