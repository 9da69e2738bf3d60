"""Apache Kafka itself: a KRaft cluster of 1 or 3 brokers, each its own JVM, data on disk.

The jars come from Maven Central once (``mvn dependency:copy-dependencies``) into a cache
outside the repository, ``~/.cache/celery-redis-retry/kafka-<version>/lib``; after that
no network is needed. Every node runs as broker and controller at once (combined mode),
on free loopback ports, with a small heap, so a test can SIGKILL, SIGSTOP or restart one
node and the others go on. A restarted node keeps its log (it is formatted only once).

The cluster is set up the way production clusters are: ``auto.create.topics.enable=false``
and, with 3 brokers, replication factor 3 and ``min.insync.replicas=2`` for every topic,
including the internal offsets and transaction topics::

    with ApacheKafka(brokers=3).start() as cluster:
        cluster.create_topic("redis-retry-queue", partitions=4)
        leader = cluster.leader_of("redis-retry-queue", 0)
        leader.kill()
        ...
        leader.start()

Kept whole: one class per process kind (a node, a cluster) whose start, stop, kill and
restart share the on-disk layout and the port bookkeeping written here.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery_redis_retry.errors import HarnessError, HarnessTimeoutError
from celery_redis_retry.kafka import KafkaException, create_topics, new_admin, new_producer, produce_confirmed
from celery_redis_retry.kafka.topics import min_insync_for
from celery_redis_retry.testing.processes import ManagedProcess, _StartedGroup, free_ports, wait_until

if TYPE_CHECKING:
    from typing_extensions import Self

#: The Apache Kafka release the harness runs (any 4.x that Maven Central serves works).
KAFKA_VERSION = "4.1.1"

#: The SASL mechanism of the SASL_SSL listener.
SCRAM_MECHANISM = "SCRAM-SHA-512"

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.celery-redis-retry</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{version}</version></dependency>
    <!-- Kafka logs through SLF4J; without a binding a broker that fails to start says nothing. -->
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>2.0.17</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>2.24.3</version></dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.stdout.ref = STDOUT
# Per-request and per-fetch chatter that buries what a failing test needs to see.
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
"""


def java_binary() -> str:
    """Path of ``java`` (``$JAVA_HOME/bin/java``, else ``PATH``).

    :raises HarnessError: if there is none (Apache Kafka 4 needs Java 17 or newer).
    """
    home = os.environ.get("JAVA_HOME")
    candidates = [str(Path(home) / "bin" / "java")] if home else []
    candidates.append(shutil.which("java") or "")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise HarnessError("no java found: Apache Kafka 4 needs Java 17+ on PATH (or JAVA_HOME)")


def kafka_cache_dir(version: str = KAFKA_VERSION) -> Path:
    """Where the jars of ``version`` are kept: ``$CRR_KAFKA_CACHE`` or ``~/.cache/celery-redis-retry``."""
    base = os.environ.get("CRR_KAFKA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "celery-redis-retry"
    )
    return Path(base) / f"kafka-{version}"


def kafka_libs(version: str = KAFKA_VERSION, *, timeout: float = 600.0) -> Path:
    """The folder of Apache Kafka ``version``'s jars, resolved through Maven on first use.

    Resolution runs ``mvn dependency:copy-dependencies`` into a temporary folder that is
    renamed into place only when complete, under a file lock, so concurrent test runs
    neither resolve twice nor see half a folder. It takes ~10 s with a warm network.

    :raises HarnessError: if ``mvn`` is missing or the resolution fails (its output is in the message).
    """
    libs = kafka_cache_dir(version) / "lib"
    if (libs / f"kafka_2.13-{version}.jar").exists():
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise HarnessError(f"Apache Kafka {version} is not in {libs} and there is no `mvn` to fetch it")
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (libs / f"kafka_2.13-{version}.jar").exists():  # another run resolved it while we waited
            return libs
        work = Path(tempfile.mkdtemp(prefix="resolve-", dir=libs.parent))
        try:
            (work / "pom.xml").write_text(_POM.format(version=version))
            done = subprocess.run(
                [mvn, "-q", "-B", "dependency:copy-dependencies", f"-DoutputDirectory={work / 'lib'}",
                 "-DincludeScope=runtime"],
                cwd=work, capture_output=True, text=True, timeout=timeout, check=False,
            )
            if done.returncode != 0:
                raise HarnessError(
                    f"mvn could not resolve org.apache.kafka:kafka_2.13:{version} ({done.returncode}):\n"
                    + (done.stdout + done.stderr)[-3000:]
                )
            shutil.rmtree(libs, ignore_errors=True)
            (work / "lib").rename(libs)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return libs


def _cluster_id() -> str:
    # KRaft wants 16 random bytes in URL-safe base64 without padding (what `random-uuid` prints).
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


class SelfSignedCertificates:
    """A throw-away certificate authority and a broker certificate for 127.0.0.1, made with ``openssl``.

    :attr:`ca_certificate` is what clients trust (``ssl.ca.location``); :attr:`broker_keystore`
    holds the broker's unencrypted PKCS#8 key and its certificate, as Kafka's PEM keystore wants.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.ca_certificate = folder / "ca.pem"
        self.broker_keystore = folder / "broker-keystore.pem"
        openssl = shutil.which("openssl")
        if openssl is None:
            raise HarnessError("no openssl found: it makes the certificates of the SASL_SSL listener")
        ca_key, key, request, certificate = (folder / n for n in ("ca-key.pem", "broker-key.pem", "broker.csr",
                                                                  "broker.pem"))
        extensions = folder / "san.cnf"
        extensions.write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
        for argv in (
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", self.ca_certificate,
             "-days", "2", "-subj", "/CN=celery-redis-retry test CA"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request, "-subj", "/CN=localhost"],
            ["x509", "-req", "-in", request, "-CA", self.ca_certificate, "-CAkey", ca_key, "-CAcreateserial",
             "-out", certificate, "-days", "2", "-extfile", extensions],
        ):
            done = subprocess.run([openssl, *map(str, argv)], capture_output=True, text=True, timeout=60, check=False)
            if done.returncode != 0:
                raise HarnessError(f"openssl {argv[0]} failed: {done.stderr.strip()}")
        self.broker_keystore.write_text(key.read_text() + certificate.read_text())


class KafkaUser:
    """An :class:`ApacheKafka` cluster as one SCRAM user reaches it over SASL_SSL.

    It quacks like a broker for the tests (:attr:`bootstrap_servers`, :attr:`config`,
    :meth:`create_topic`); topics are created by the cluster's super user, not this one.
    """

    def __init__(self, cluster: ApacheKafka, config: dict[str, str]) -> None:
        self.cluster = cluster
        self.config = config
        self.bootstrap_servers = config["bootstrap.servers"]

    def create_topic(self, name: str, partitions: int = 4, **options: Any) -> None:
        """Create ``name`` as the cluster's super user (see :meth:`ApacheKafka.create_topic`)."""
        self.cluster.create_topic(name, partitions, **options)


class KafkaNode(ManagedProcess):
    """One Apache Kafka JVM of an :class:`ApacheKafka` cluster (broker and controller at once).

    :meth:`start` after :meth:`kill` or :meth:`stop` brings it back on the same ports with
    the same log; :meth:`pause` and :meth:`resume` freeze and thaw it (SIGSTOP/SIGCONT).
    """

    def __init__(
        self, cluster: ApacheKafka, node_id: int, port: int, controller_port: int, sasl_port: int | None = None
    ) -> None:
        self.cluster = cluster
        self.node_id = node_id
        self.port = port
        self.controller_port = controller_port
        #: Port of its SASL_SSL listener, on a cluster with SCRAM users.
        self.sasl_port = sasl_port
        self.dir = cluster.dir / f"node-{node_id}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.properties_path = self.dir / "server.properties"
        argv = [
            java_binary(), f"-Xms{cluster.heap}", f"-Xmx{cluster.heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={cluster.dir / 'log4j2.properties'}",
            "-cp", str(cluster.libs / "*"),
        ]
        self._java = argv
        super().__init__([*argv, "kafka.Kafka", str(self.properties_path)], name=f"kafka-{node_id}-{port}",
                         log_dir=self.dir)

    def __repr__(self) -> str:
        return f"<KafkaNode {self.node_id} 127.0.0.1:{self.port} pid={self.pid} running={self.running}>"

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of its client listener."""
        return f"127.0.0.1:{self.port}"

    def format(self, cluster_id: str) -> None:
        """Write ``server.properties`` and format the log folder (KRaft's ``StorageTool format``)."""
        self.properties_path.write_text(
            "".join(f"{key}={value}\n" for key, value in self.cluster.node_properties(self).items())
        )
        done = subprocess.run(
            # --cluster-id=ID, not -t ID: one id in 64 starts with "-", which argparse takes for an option.
            [*self._java, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
             "-c", str(self.properties_path), *self.cluster.format_args],
            capture_output=True, text=True, timeout=120, check=False,
        )
        if done.returncode != 0:
            output = (done.stdout + done.stderr)[-3000:]
            raise HarnessError(f"kafka storage format of node {self.node_id} failed:\n{output}")

    def start(self, timeout: float = 60.0) -> Self:
        """Launch the JVM and wait until its client port accepts connections."""
        return self._start_and_wait(lambda: self.wait_until(lambda: _accepts(self.port), timeout,
                                                            f"port {self.port} to accept connections"))


class ApacheKafka(_StartedGroup):
    """A KRaft cluster of ``brokers`` Apache Kafka nodes on 127.0.0.1, with production-like topics.

    ``properties`` are added to (or override) every node's ``server.properties``.
    :attr:`start_seconds` is how long :meth:`start` took, from the first JVM launched to
    an idempotent produce acknowledged by the cluster.
    """

    def __init__(
        self, brokers: int = 1, *, dir: str | os.PathLike[str] | None = None,  # noqa: A002
        heap: str = "384m", properties: Mapping[str, Any] | None = None, version: str = KAFKA_VERSION,
        scram_users: Mapping[str, str] | None = None,
    ) -> None:
        if brokers < 1:
            raise ValueError(f"brokers must be at least 1, not {brokers}")
        self.dir = Path(dir) if dir is not None else Path(tempfile.mkdtemp(prefix="crr-apache-kafka-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.heap = heap
        self.version = version
        self.extra_properties = dict(properties or {})
        self.libs = kafka_libs(version)
        (self.dir / "log4j2.properties").write_text(_LOG4J2)
        #: SCRAM-SHA-512 users (name -> password) of the SASL_SSL listener; none: no such listener.
        self.scram_users = dict(scram_users or {})
        #: Extra arguments for ``StorageTool format``: the SCRAM credentials live in the metadata log.
        self.format_args = [
            arg for name, password in self.scram_users.items()
            for arg in ("--add-scram", f"{SCRAM_MECHANISM}=[name={name},password={password}]")
        ]
        self.tls = SelfSignedCertificates(self.dir / "tls") if self.scram_users else None
        ports = iter(free_ports(brokers * (3 if self.scram_users else 2)))
        self.nodes = [
            KafkaNode(self, node_id, next(ports), next(ports), next(ports) if self.scram_users else None)
            for node_id in range(1, brokers + 1)
        ]
        self.start_seconds: float | None = None
        self._formatted = False

    @property
    def replication_factor(self) -> int:
        """The replication factor of every topic: 3 on a 3-broker cluster, else the broker count."""
        return min(3, len(self.nodes))

    @property
    def min_insync_replicas(self) -> int:
        """``min.insync.replicas``, by the rule ``redis-retry topics create`` follows (2 from RF 3 on)."""
        return min_insync_for(self.replication_factor)

    @property
    def bootstrap_servers(self) -> str:
        """Every node's client address, comma separated."""
        return ",".join(node.address for node in self.nodes)

    @property
    def config(self) -> dict[str, str]:
        """The client settings to reach the cluster, e.g. for ``redis_retry_kafka``."""
        return {"bootstrap.servers": self.bootstrap_servers}

    def node_properties(self, node: KafkaNode) -> dict[str, Any]:
        """The ``server.properties`` of ``node``."""
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        rf, isr = self.replication_factor, self.min_insync_replicas
        listeners = f"PLAINTEXT://127.0.0.1:{node.port}"
        return {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "controller.quorum.voters": voters,
            "listeners": f"{listeners},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": listeners,
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": node.dir / "data",
            "auto.create.topics.enable": "false",
            "num.partitions": 4,
            "default.replication.factor": rf,
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": rf,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            # Fewer internal partitions than the default 50: the cluster starts in seconds.
            "offsets.topic.num.partitions": 6,
            "transaction.state.log.num.partitions": 6,
            "group.initial.rebalance.delay.ms": 0,
            # A SIGKILLed node is fenced after 6 s without heartbeats instead of 9 s.
            "broker.heartbeat.interval.ms": 1000,
            "broker.session.timeout.ms": 6000,
            # KIP-848 groups (group.protocol=consumer): the broker decides when a member is dead.
            # Its defaults (45 s session, 5 s heartbeat) would hold a killed bridge's
            # partitions for most of a minute; a test wants seconds.
            "group.consumer.min.session.timeout.ms": 6000,
            "group.consumer.session.timeout.ms": 10000,
            "group.consumer.min.heartbeat.interval.ms": 500,
            "group.consumer.heartbeat.interval.ms": 1000,
            "log.segment.bytes": 16 * 1024 * 1024,
            **self._sasl_properties(node, listeners),
            **self.extra_properties,
        }

    def _sasl_properties(self, node: KafkaNode, plaintext: str) -> dict[str, Any]:
        # A SASL_SSL listener beside the PLAINTEXT one, with ACLs enforced. The brokers,
        # the controllers and this harness talk over PLAINTEXT as User:ANONYMOUS, a super
        # user: the cluster stays manageable while clients on SASL_SSL get only their ACLs.
        if self.tls is None:
            return {}
        sasl = f"SASL_SSL://127.0.0.1:{node.sasl_port}"
        return {
            "listeners": f"{plaintext},{sasl},CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"{plaintext},{sasl}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL",
            "sasl.enabled.mechanisms": SCRAM_MECHANISM,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                "org.apache.kafka.common.security.scram.ScramLoginModule required;",
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": self.tls.broker_keystore,
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": self.tls.ca_certificate,
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            "super.users": "User:ANONYMOUS",
        }

    def user_config(self, name: str, password: str | None = None) -> dict[str, str]:
        """Client settings for SCRAM user ``name`` over SASL_SSL (its own password unless given)."""
        if self.tls is None:
            raise HarnessError("this cluster has no SASL_SSL listener: pass scram_users=...")
        return {
            "bootstrap.servers": ",".join(f"127.0.0.1:{n.sasl_port}" for n in self.nodes),
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": SCRAM_MECHANISM,
            "sasl.username": name,
            "sasl.password": self.scram_users.get(name, "") if password is None else password,
            "ssl.ca.location": str(self.tls.ca_certificate),
        }

    def as_user(self, name: str, password: str | None = None) -> KafkaUser:
        """This cluster as SCRAM user ``name`` sees it: a broker-like object for LoopStack and tests."""
        return KafkaUser(self, self.user_config(name, password))

    def allow(self, principal: str, resource: str, name: str, *operations: str, prefixed: bool = False) -> None:
        """Grant ``operations`` (``"READ"``, ``"WRITE"``, ``"DESCRIBE"``...) on a ``"topic"``, ``"group"``
        or ``"cluster"`` to ``principal`` (``"User:app"``); ``prefixed`` matches every name starting with it."""
        # The ACL types, needed by the test harness only (their submodules are typed; the package is not).
        from confluent_kafka.admin._acl import AclBinding, AclOperation, AclPermissionType
        from confluent_kafka.admin._resource import ResourcePatternType, ResourceType

        pattern = ResourcePatternType.PREFIXED if prefixed else ResourcePatternType.LITERAL
        bindings = [
            AclBinding(ResourceType[resource.upper()], name, pattern, principal, "*", AclOperation[operation.upper()],
                       AclPermissionType.ALLOW)
            for operation in operations
        ]
        admin = new_admin(self.config)
        for future in admin.create_acls(bindings, request_timeout=10).values():
            future.result(15)

    def start(self, timeout: float = 120.0) -> Self:
        """Format (first time only) and start every node, then wait until the cluster takes writes.

        Ready means an idempotent ``acks=all`` produce to a replicated probe topic was
        acknowledged: every node is up, the quorum has a leader, and the transaction
        coordinator that hands out producer ids has loaded.
        """
        started = time.monotonic()
        if not self._formatted:
            cluster_id = _cluster_id()
            for node in self.nodes:
                node.format(cluster_id)
            self._formatted = True
        try:
            for node in self.nodes:
                if not node.running:
                    ManagedProcess.start(node)
            for node in self.nodes:
                node.wait_until(lambda n=node: _accepts(n.port), timeout, f"port {node.port} to accept connections")  # type: ignore[misc]
            self.wait_writable(timeout)
        except BaseException:
            self.kill()
            raise
        self.start_seconds = time.monotonic() - started
        return self

    def wait_writable(self, timeout: float = 60.0) -> None:
        """Wait until an idempotent ``acks=all`` produce to the probe topic is acknowledged."""
        probe = "__crr_ready"
        deadline = time.monotonic() + timeout
        wait_until(lambda: self._try_create(probe, 1, self.replication_factor, {}), timeout, interval=0.5,
                   what="the cluster to create its probe topic")
        producer = new_producer(self.config, **{"message.timeout.ms": 5000})
        error: str | None = "not tried"
        while time.monotonic() < deadline:
            error = produce_confirmed(producer, probe, [(None, b"ready", None)])[0]
            if error is None:
                return
            time.sleep(0.2)
        raise HarnessTimeoutError(f"the cluster at {self.bootstrap_servers} took no write in {timeout}s ({error})")

    def create_topic(
        self, name: str, partitions: int = 4, replication: int | None = None, config: Mapping[str, str] | None = None,
    ) -> None:
        """Create ``name`` (replication factor :attr:`replication_factor` unless given); an existing one is kept."""
        if not self._try_create(name, partitions, replication or self.replication_factor, dict(config or {})):
            raise HarnessError(f"topic {name!r} was not created on {self.bootstrap_servers}")

    def _try_create(self, name: str, partitions: int, replication: int, config: dict[str, str]) -> bool:
        error = create_topics(new_admin(self.config), [(name, partitions, replication, config)], timeout=10)[name]
        if error is None or error.name() == "TOPIC_ALREADY_EXISTS":
            return True
        if error.retriable() or error.name() in ("_TRANSPORT", "_TIMED_OUT", "INVALID_REPLICATION_FACTOR"):
            return False  # the cluster is not up yet (or not every broker has registered)
        raise HarnessError(f"create topic {name!r}: {error}")

    def node(self, node_id: int) -> KafkaNode:
        """The node with ``node.id`` ``node_id``."""
        return next(node for node in self.nodes if node.node_id == node_id)

    def leader_of(self, topic: str, partition: int = 0, timeout: float = 30.0) -> KafkaNode:
        """The node that leads ``topic``/``partition`` now (waits while there is none)."""
        def leader() -> int | None:
            alive = [node for node in self.nodes if node.running]
            admin = new_admin({"bootstrap.servers": ",".join(n.address for n in alive)})
            with contextlib.suppress(KafkaException):
                metadata = admin.list_topics(topic, timeout=5)
                found = metadata.topics.get(topic)
                if found is not None and partition in found.partitions:
                    node_id: int = found.partitions[partition].leader
                    return node_id if node_id >= 0 else None
            return None

        return self.node(wait_until(leader, timeout, interval=0.2, what=f"a leader for {topic}/{partition}"))

    def describe_group(self, group_id: str) -> tuple[str, int]:
        """The group's rebalance protocol (``"consumer"``, KIP-848, or ``"classic"``) and its member count."""
        admin = new_admin(self.config)  # kept alive until the answer arrives: its futures die with it
        described = admin.describe_consumer_groups([group_id], request_timeout=10)[group_id].result(15)
        return described.type.name.lower(), len(described.members)

    def kill(self) -> None:
        """SIGKILL every node (a power cut); :meth:`start` brings the cluster back with its data."""
        for node in self.nodes:
            node.kill()

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL after 10 s: a broker whose peers are gone may not finish)."""
        for node in self.nodes:
            if node.running:
                node._signal_group(signal.SIGTERM)
        for node in self.nodes:
            node.stop(timeout=10)
