"""``redis_retry_targets`` URLs: parsed in one place for the settings check, the replay
connection (:func:`celery_redis_retry.targets.connect`) and ``wrap()``'s check that a
client talks to its target's server.

Forms: ``redis://HOST[:PORT][/DB]``, ``rediss://...``, ``unix:///PATH[?db=N]``,
``redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE[/DB]`` (and ``rediss+sentinel``),
``redis+cluster://HOST[:PORT]`` (any node; the others are discovered; ``rediss+cluster``).
Host names are compared as written (``localhost`` and ``127.0.0.1`` count as the same
host); no DNS name is resolved.
"""

from __future__ import annotations

import inspect
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, parse_qs, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import (
    URL_QUERY_ARGUMENT_PARSERS,
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.retry import Retry

from celery_redis_retry.errors import PermanentReplayError, TargetURLError

TARGET_SCHEMES = frozenset(
    ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")
)
_LOOPBACK = frozenset(("localhost", "127.0.0.1", "::1"))


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
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed [IPv6 address
        raise TargetURLError(f"is not a URL: {exc}") from None
    if parts.scheme not in TARGET_SCHEMES:
        raise TargetURLError(f"must be a Redis URL ({', '.join(sorted(TARGET_SCHEMES))}://...)")
    if not url[len(parts.scheme):].startswith("://"):
        raise TargetURLError(f"must start with {parts.scheme}:// (two slashes)")
    if parts.fragment:
        raise TargetURLError(f"has a fragment '#{parts.fragment}', which no Redis URL has")
    if parts.scheme.endswith("+sentinel"):
        return _sentinel(parts)
    if parts.scheme.endswith("+cluster"):
        return _cluster(parts)
    options = _query_options(url)
    if parts.scheme == "unix":
        if parts.hostname:  # redis-py would drop it and use the rest as the path
            raise TargetURLError(f"names host {parts.hostname!r} (write unix:///path/to/redis.sock, three slashes)")
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


# A host name (letters, digits, '.', '-', '_' as container names have), or an IPv6 address with its zone.
_HOST = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]+(%[A-Za-z0-9._-]+)?")


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
        if not _HOST.fullmatch(host.strip("[]")):
            raise TargetURLError(f"{what} {node!r} has a host that is neither a name nor an IP address")
        nodes.append((host.strip("[]").lower(), int(port or default_port or 0)))
    return tuple(nodes)


def _cluster(parts: SplitResult) -> TargetAddress:
    if not parts.netloc.rpartition("@")[2]:
        raise TargetURLError(f"names no node (write {parts.scheme}://HOST:PORT[,HOST:PORT...])")
    nodes = _nodes(parts, default_port=6379, what="cluster node")
    db = _db(parts.path, _query_options(_query_url(parts)))
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
    if "db" in _query_options(_query_url(parts)):  # the replay connects with the path's (see connect)
        raise TargetURLError("names its database in the query: write it as the path, /SERVICE/DB")
    return TargetAddress("sentinel", nodes, db=int(path[1]) if len(path) == 2 else 0, service=path[0])


def _query_url(parts: SplitResult) -> str:
    """The plain ``redis://`` (``rediss://``) URL of a Sentinel or cluster URL's query, as redis-py reads one."""
    return f"{parts.scheme.split('+')[0]}://localhost?{parts.query}"


def _query_options(url: str) -> dict[str, Any]:
    """The options redis-py makes of a plain URL, checked as a connection would take them."""
    try:
        # redis-py's own parser: what it accepts here is what the clients will get.
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise TargetURLError(str(exc).rstrip(".")) from None  # the settings add ", got <URL>"
    _check_query_names(parse_qs(urlsplit(url).query))
    _check_connection_options(options)
    return options


# What a connection pool takes for itself rather than passing to each connection.
_POOL_OPTIONS = frozenset(
    name for name in inspect.signature(ConnectionPool.__init__).parameters if name not in ("self", "connection_kwargs")
)


def _accepted_options(connection_class: type) -> frozenset[str]:
    """The keyword arguments a redis-py connection class takes, its base classes' included."""
    names = set()
    for cls in connection_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            names |= {p.name for p in inspect.signature(init).parameters.values() if p.kind in kinds}
    return frozenset(names - {"self"})


# Options a URL's query gives as text that redis-py uses as text; redis-py types the others
# it knows (URL_QUERY_ARGUMENT_PARSERS). Any other connection argument (``retry``,
# ``decode_responses``: "false" is true) would get a string it cannot use.
_TEXT_OPTIONS = frozenset((
    "client_name", "lib_name", "lib_version", "username", "password", "encoding", "encoding_errors",
    "ssl_keyfile", "ssl_certfile", "ssl_cert_reqs", "ssl_ca_certs", "ssl_ca_path", "ssl_ca_data", "ssl_ciphers",
    "ssl_password", "ssl_ocsp_expected_cert",
))


def _check_query_names(query: Mapping[str, Any]) -> None:
    """Refuse a query option redis-py would pass to the connection as text it cannot use."""
    untyped = sorted(set(query) - _TEXT_OPTIONS - set(URL_QUERY_ARGUMENT_PARSERS))
    usable = _accepted_options(SSLConnection) | _accepted_options(UnixDomainSocketConnection)
    if set(untyped) & usable:  # the unknown ones are named by _check_connection_options
        names = ", ".join(name for name in untyped if name in usable)
        raise TargetURLError(f"sets {names} in its query, which redis-py would pass on as text it cannot use")


def _check_connection_options(options: dict[str, Any]) -> None:
    """Refuse what redis-py would refuse only when it first connects: an option its connection
    class does not take (``?socket_timout=2``), a value it rejects (``?ssl_cert_reqs=sometimes``)."""
    connection_class = options.get("connection_class", Connection)
    given = {name: value for name, value in options.items() if name not in _POOL_OPTIONS}
    unknown = sorted(set(given) - _accepted_options(connection_class))
    if unknown:
        tls = "; a TLS option needs rediss://" if set(unknown) <= _accepted_options(SSLConnection) else ""
        raise TargetURLError(
            f"has the unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
            f"(redis-py's {connection_class.__name__} takes no such argument{tls})"
        )
    try:
        connection_class(**given)  # built, not connected: it checks its arguments
    except (TypeError, ValueError, redis.RedisError) as exc:
        raise TargetURLError(f"has an option redis-py refuses: {exc}") from None


# ``user:PASSWORD@`` (up to the last ``@`` before the path) and ``password=`` in the query.
_PASSWORDS = re.compile(r"(?P<keep>://[^:/?#@]*:)[^/?#]*(?=@)|(?P<key>[?&]password=)[^&#]*")


def redacted(url: str) -> str:
    """``url`` with its passwords (``user:PASSWORD@``, ``?password=``) replaced by ``***``, for messages.

    Any string is shown so, a URL that does not parse too.
    """
    if not isinstance(url, str):
        return str(url)
    return _PASSWORDS.sub(lambda m: f"{m.group('keep') or m.group('key')}***", url)


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


# Client defaults: redis-py waits forever without timeouts, and its own retries would
# sleep inside the worker; Celery's countdown is the retry loop here.
_CLIENT_DEFAULTS: dict[str, Any] = {
    "socket_timeout": 5.0,
    "socket_connect_timeout": 5.0,
    "health_check_interval": 30,
}


def connect(url: str, **overrides: Any) -> Any:
    """A redis-py client for a ``redis_retry_targets`` URL (plain, TLS, unix, Sentinel, Cluster).

    Sentinel: ``redis+sentinel://host1:26379,host2:26379/<service>/<db>``.
    Cluster: ``redis+cluster://host:port[,host:port...]`` (any nodes; the others are discovered).
    Query parameters (``?socket_timeout=2``...) are passed to redis-py as usual;
    ``overrides`` replace this module's client defaults (the circuit probe's short timeouts).
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    try:
        address = parse_target_url(url)  # the settings checked it already: this names what is wrong
    except TargetURLError as exc:
        raise PermanentReplayError(f"target URL {redacted(url)} {exc}", reason="configuration") from None
    if address.kind == "cluster":
        from redis.cluster import ClusterNode, RedisCluster

        # redis-py's URL parser takes one node: the first; the others seed the discovery too.
        userinfo = parts.netloc.rpartition("@")[0]
        first = parts._replace(scheme=scheme.split("+")[0], netloc=(userinfo + "@" if userinfo else "")
                               + parts.netloc.rpartition("@")[2].split(",")[0]).geturl()
        others = [ClusterNode(host, port) for host, port in address.nodes[1:]]  # type: ignore[no-untyped-call]
        return RedisCluster.from_url(
            first, startup_nodes=others, **_defaults_for(parts.query, overrides), retry=Retry(NoBackoff(), 0)
        )
    if address.kind == "sentinel":
        from redis.sentinel import Sentinel

        # redis-py's own URL parser turns the query (?socket_timeout=2...) into typed options.
        given = parse_url(f"redis://?{parts.query}") if parts.query else {}  # type: ignore[no-untyped-call]
        # rediss+sentinel: TLS to the Sentinels and to the master, with the query's ssl_* options.
        tls: dict[str, Any] = {}
        if scheme == "rediss+sentinel":
            tls = {"ssl": True, **{k: v for k, v in given.items() if k.startswith("ssl_")}}
        options = {
            **_defaults_for(parts.query, overrides), **given, **tls,
            "password": parts.password, "username": parts.username,
        }
        # redis-py 8.2 types Sentinel; earlier releases do not.
        sentinel = Sentinel(list(address.nodes), sentinel_kwargs={"socket_timeout": 2.0, **tls}, **options)  # type: ignore[no-untyped-call,unused-ignore]
        return sentinel.master_for(address.service, db=address.db, retry=Retry(NoBackoff(), 0))  # type: ignore[no-untyped-call,unused-ignore]
    return redis.Redis.from_url(url, **_defaults_for(parts.query, overrides), retry=Retry(NoBackoff(), 0))


def is_cluster_url(url: str) -> bool:
    """Whether a ``redis_retry_targets`` URL names a Redis Cluster."""
    return urlsplit(url).scheme.endswith("+cluster")


def _defaults_for(query: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    given = parse_qs(query)
    return {k: v for k, v in {**_CLIENT_DEFAULTS, **(overrides or {})}.items() if k not in given}


class TargetClients:
    """One client (and connection pool) per target, created lazily in each process."""

    def __init__(self, targets: dict[str, str] | Any) -> None:
        self._targets = dict(targets)
        self._clients: dict[str, Any] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def is_cluster(self, target: str) -> bool:
        """Whether ``target`` is a Redis Cluster (its ops may span slots)."""
        return is_cluster_url(self._targets[target])

    def get(self, target: str) -> Any:
        """The client for ``target``; a pool is never shared with a forked parent."""
        if self._pid != os.getpid():
            self._clients, self._pid, self._lock = {}, os.getpid(), threading.Lock()
        client = self._clients.get(target)
        if client is None:
            with self._lock:
                client = self._clients.get(target)
                if client is None:
                    client = self._clients[target] = connect(self._targets[target])
        return client
