"""The real-process harness itself (celery_redis_retry.testing): if these fail, nothing else can be trusted."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from conftest import HARNESS_TIMINGS
from kombu import Connection
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from celery_redis_retry.kafka import new_consumer, new_producer
from celery_redis_retry.testing import (
    TEST_CONSUMER_SETTINGS,
    CeleryWorker,
    EmbeddedKafka,
    HarnessError,
    HarnessTimeoutError,
    KafkaBroker,
    ManagedProcess,
    ProcessExitedError,
    RabbitMQServer,
    RedisCluster,
    RedisServer,
    TansuKafka,
    TopicRecord,
    read_topic,
    redis_server_binary,
    valkey_server_binary,
    wait_until,
)

pytestmark = pytest.mark.slow

APPS_DIR = Path(__file__).parent / "apps"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of ours is reparented and reaped by init; until then it is a zombie.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


# -- ManagedProcess --------------------------------------------------------------------------


def test_wait_for_log_fails_with_the_log_tail_when_the_process_exits(tmp_path: Path) -> None:
    process = ManagedProcess([sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"], log_dir=tmp_path)
    with pytest.raises(ProcessExitedError, match=r"(?s)code 3.*about to fail"):
        process.start().wait_for_log("never printed", timeout=10)
    assert process.returncode == 3
    assert "about to fail" in process.log_text()


def test_wait_for_log_times_out_with_the_log_tail_and_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('stubborn'); time.sleep(60)"
    with ManagedProcess([sys.executable, "-c", code], log_dir=tmp_path) as process:
        assert process.wait_for_log(r"^stub(\w+)$", timeout=10).group(1) == "born"
        with pytest.raises(HarnessTimeoutError, match=r"(?s)never.*stubborn") as raised:
            process.wait_for_log("never", timeout=0.3)
        assert isinstance(raised.value, TimeoutError)
        assert process.stop(timeout=0.5) == -signal.SIGKILL
        assert not process.running


def test_kill_takes_the_whole_process_group(tmp_path: Path) -> None:
    process = ManagedProcess(["sh", "-c", "sleep 60 & echo child=$!; wait"], log_dir=tmp_path).start()
    child = int(process.wait_for_log(r"child=(\d+)", timeout=10).group(1))
    assert _alive(child)
    assert process.kill() == -signal.SIGKILL
    assert not process.running
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


# -- Redis -----------------------------------------------------------------------------------


def test_redis_binary_is_found() -> None:
    assert os.access(redis_server_binary(), os.X_OK)


def test_redis_server_set_get_kill_restart(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    with redis.Redis.from_url(redis_server.url) as client:
        client.set("k", b"\x00v")
        assert client.get("k") == b"\x00v"
    port = redis_server.port

    redis_server.kill()
    assert not redis_server.running
    with redis_server.client(retry=Retry(NoBackoff(), 0)) as client, pytest.raises(redis.ConnectionError):
        client.ping()

    redis_server.restart()
    assert redis_server.port == port
    with redis_server.client() as client:
        assert client.ping()
        assert client.get("k") is None  # no persistence: the data went with the process


def test_two_redis_servers_at_once(redis_factory: Callable[..., RedisServer]) -> None:
    first, second = redis_factory(), redis_factory(args=["--maxmemory", "10mb"])
    assert first.port != second.port
    with first.client() as a, second.client() as b:
        a.set("who", "first")
        b.set("who", "second")
        assert (a.get("who"), b.get("who")) == (b"first", b"second")
        assert b.config_get("maxmemory")["maxmemory"] == str(10 * 1024 * 1024)
    first.kill()
    with second.client() as b:
        assert b.ping()


# -- Valkey ----------------------------------------------------------------------------------


def test_the_valkey_binary_is_valkey_8_1() -> None:
    done = subprocess.run([valkey_server_binary(), "--version"], capture_output=True, text=True, timeout=30, check=True)
    assert re.match(r"Valkey server v=8\.1\.\d+ ", done.stdout), done.stdout


def test_a_bad_valkey_override_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CRR_VALKEY_SERVER", str(tmp_path / "no-such-valkey-server"))
    with pytest.raises(HarnessError, match="CRR_VALKEY_SERVER="):
        valkey_server_binary()


def test_redis_server_runs_valkey_when_given_its_binary(tmp_path: Path) -> None:
    with RedisServer(dir=str(tmp_path / "single"), binary=valkey_server_binary()).start() as server:
        assert server.name == f"valkey-{server.port}"
        with server.client() as client:
            assert client.info("server")["valkey_version"].startswith("8.1.")
            client.set("k", "v")
            assert client.get("k") == b"v"
    with RedisCluster(3, dir=str(tmp_path / "cluster"), binary=valkey_server_binary()) as cluster:
        for node in cluster.nodes:
            with node.client() as client:
                assert "valkey_version" in client.info("server")
        with cluster.client() as client:
            client.mset_nonatomic({f"key-{i}": i for i in range(30)})  # lands on every node
            assert client.get("key-29") == b"29"


# -- Redis Cluster with replicas -------------------------------------------------------------


@pytest.fixture(scope="module")
def replicated_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """3 masters with a replica each, shared by the module: a test that kills a node restarts it."""
    with RedisCluster(3, replicas=1, dir=str(tmp_path_factory.mktemp("replicated-cluster"))) as cluster:
        yield cluster


def _role(node: RedisServer) -> tuple[str, int | None, str | None]:
    """(role, port of its master, link status) of a node now."""
    replication = node.replication()
    assert replication is not None, f"{node.name} does not answer"
    return replication["role"], replication.get("master_port"), replication.get("master_link_status")


def test_a_cluster_with_replicas_gives_every_master_a_replica_in_sync(replicated_cluster: RedisCluster) -> None:
    cluster = replicated_cluster
    assert len(cluster.nodes) == 6
    masters = [cluster.master_of(slot) for slot in (0, 8192, RedisCluster.SLOTS - 1)]
    replicas = [cluster.replica_of(master) for master in masters]
    assert len(set(masters)) == 3
    assert set(masters) | set(replicas) == set(cluster.nodes)
    for master, replica in zip(masters, replicas, strict=True):
        assert _role(master)[0] == "master"
        assert _role(replica) == ("slave", master.port, "up")


def test_kill_master_promotes_its_replica_with_the_keys_and_the_killed_master_rejoins_as_a_replica(
    replicated_cluster: RedisCluster,
) -> None:
    cluster = replicated_cluster
    keys = {f"key-{i}": str(i).encode() for i in range(60)}  # on all three masters
    slot = key_slot(b"key-0")
    old = cluster.master_of(slot)
    heir = cluster.replica_of(old)
    with cluster.client() as client:
        client.mset_nonatomic(keys)
        # WAIT on every master: the writes reached each replica before the kill.
        assert client.wait(1, 1000, target_nodes=client.PRIMARIES) == 3

        assert cluster.kill_master(slot) is heir
        HARNESS_TIMINGS.append(f"Redis Cluster failover after SIGKILL of a master: {cluster.failover_seconds:.1f}s")

        assert not old.running
        assert cluster.killed == [old]
        assert _role(heir)[0] == "master"
        assert cluster.master_of(slot) is heir
        # The client made before the failover finds the new master and keeps working.
        assert [client.get(key) for key in keys] == list(keys.values())
        client.set("key-0", "after")
        assert client.get("key-0") == b"after"

    assert cluster.restart_killed() == [old]
    assert old.running
    assert cluster.killed == []
    assert _role(old) == ("slave", heir.port, "up")
    with old.client() as replica:
        replica.execute_command("READONLY")  # a cluster replica answers reads of its master's slots
        assert replica.get("key-0") == b"after"


def test_failover_swaps_a_master_and_its_replica(replicated_cluster: RedisCluster) -> None:
    cluster = replicated_cluster
    slot = key_slot(b"swapped")
    old = cluster.master_of(slot)
    heir = cluster.replica_of(old)

    assert cluster.failover(slot) is heir
    HARNESS_TIMINGS.append(f"Redis Cluster manual CLUSTER FAILOVER: {cluster.failover_seconds:.1f}s")

    assert cluster.master_of(slot) is heir
    assert _role(heir)[0] == "master"
    assert _role(old) == ("slave", heir.port, "up")
    assert cluster.replica_of(heir) is old
    with cluster.client() as client:
        client.set("swapped", "yes")
        assert client.get("swapped") == b"yes"


def test_a_cluster_without_replicas_refuses_a_failover_and_kills_nothing(tmp_path: Path) -> None:
    with RedisCluster(3, dir=str(tmp_path / "cluster")) as cluster:
        assert len(cluster.nodes) == 3
        with pytest.raises(HarnessError, match="has no running replica"):
            cluster.kill_master()
        with pytest.raises(HarnessError, match="has no running replica"):
            cluster.failover()
        assert all(node.running for node in cluster.nodes)
        assert cluster.killed == []


def test_a_slot_out_of_range_is_refused_by_name(replicated_cluster: RedisCluster) -> None:
    with pytest.raises(HarnessError, match=r"slot must be in 0\.\.16383, not 16384"):
        replicated_cluster.kill_master(RedisCluster.SLOTS)
    with pytest.raises(HarnessError, match="replicas >= 0"):
        RedisCluster(3, replicas=-1)


# -- RabbitMQ --------------------------------------------------------------------------------


def _processes_of_node(node_name: str) -> list[tuple[int, str]]:
    """(pid, command name) of every live process started by the node: they inherit its environment."""
    marker = f"RABBITMQ_NODENAME={node_name}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            name = (entry / "comm").read_text().strip()
        except OSError:  # gone meanwhile
            continue
        if marker in environ.split(b"\0") and _alive(int(entry.name)):
            found.append((int(entry.name), name))
    return found


def test_rabbitmq_server_carries_a_message_and_stop_frees_its_ports(
    rabbitmq_server: RabbitMQServer, tmp_path: Path
) -> None:
    # A second broker beside the session's: ports, node names and folders must not clash.
    started = time.monotonic()
    server = RabbitMQServer(dir=str(tmp_path / "rabbitmq")).start()
    try:
        print(f"\nRabbitMQ started in {time.monotonic() - started:.1f} s")
        assert server.url == f"amqp://guest:guest@127.0.0.1:{server.port}//"
        assert server.port != rabbitmq_server.port
        with Connection(server.url) as connection:
            queue = connection.SimpleQueue(f"harness-{server.port}")
            queue.put({"n": 1, "blob": "\u00ff"})
            message = queue.get(timeout=10)
            message.ack()
            assert message.payload == {"n": 1, "blob": "\u00ff"}
            queue.close()
        assert {name for _, name in _processes_of_node(server.node_name)} >= {"beam.smp"}
    finally:
        code = server.stop()
    assert code == 0  # SIGTERM is a clean shutdown for rabbitmq-server
    assert not server.connectable()
    for port in (server.port, server.dist_port):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR ignores closed connections in TIME_WAIT, not a listener.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))  # raises if anything still listens there
    # epmd, the machine-wide Erlang port mapper, may outlive the node; nothing else may.
    assert [p for p in _processes_of_node(server.node_name) if p[1] != "epmd"] == []
    assert rabbitmq_server.connectable()  # the session's broker was left alone


# -- Kafka -----------------------------------------------------------------------------------


def test_read_topic_returns_every_record_in_partition_order(kafka_broker: KafkaBroker, unique_topic: str) -> None:
    kafka_broker.create_topic(unique_topic, partitions=4)
    producer = new_producer(kafka_broker.config)
    for i in range(100):
        producer.produce(unique_topic, key=f"key-{i % 7}", value=f"value-{i}".encode(), headers={"n": str(i).encode()})
    assert producer.flush(30) == 0

    records = read_topic(kafka_broker.bootstrap_servers, unique_topic, count=100, timeout=30)

    assert len(records) == 100
    assert all(isinstance(r, TopicRecord) and r.topic == unique_topic for r in records)
    assert {r.value for r in records} == {f"value-{i}".encode() for i in range(100)}
    by_partition: dict[int, list[TopicRecord]] = defaultdict(list)
    for record in records:
        n = int(record.headers["n"])
        assert record.key == f"key-{n % 7}".encode()
        assert record.value == f"value-{n}".encode()
        assert record.timestamp_ms > 0
        by_partition[record.partition].append(record)
    assert len(by_partition) > 1  # keys spread over partitions
    for partition_records in by_partition.values():
        # One key always lands on one partition, so production order is partition order.
        assert [r.offset for r in partition_records] == sorted(r.offset for r in partition_records)
        numbers = [int(r.headers["n"]) for r in partition_records]
        assert numbers == sorted(numbers)
    # Without count, it reads until the topic is idle and finds the same records.
    again = read_topic(kafka_broker.bootstrap_servers, unique_topic, idle=1.0)
    assert sorted((r.partition, r.offset) for r in again) == sorted((r.partition, r.offset) for r in records)


def test_read_topic_times_out_naming_what_it_read(kafka_broker: KafkaBroker, unique_topic: str) -> None:
    kafka_broker.create_topic(unique_topic)
    producer = new_producer(kafka_broker.config)
    for i in range(3):
        producer.produce(unique_topic, value=b"%d" % i)
    assert producer.flush(30) == 0
    with pytest.raises(TimeoutError, match="read 3 of 5 records"):
        read_topic(kafka_broker.bootstrap_servers, unique_topic, count=5, timeout=1)
    assert read_topic(kafka_broker.bootstrap_servers, f"{unique_topic}-missing", idle=0.5) == []


def _produce_one(broker: KafkaBroker, topic: str) -> None:
    producer = new_producer(broker.config)
    producer.produce(topic, value=b"x")
    assert producer.flush(30) == 0


def test_embedded_kafka_restart_forgets_everything_and_moves(tmp_path: Path, unique_topic: str) -> None:
    with EmbeddedKafka(log_dir=tmp_path).start() as broker:
        first_address = broker.bootstrap_servers
        _produce_one(broker, unique_topic)
        assert len(read_topic(first_address, unique_topic, count=1)) == 1
        assert broker.stop() == 0  # SIGTERM is its normal shutdown
        broker.start()
        assert broker.bootstrap_servers != first_address
        assert read_topic(broker.bootstrap_servers, unique_topic, idle=0.5) == []


def test_tansu_restarts_on_the_same_port_after_kill(tmp_path: Path, unique_topic: str) -> None:
    with TansuKafka(log_dir=tmp_path).start() as broker:
        address = broker.bootstrap_servers
        broker.create_topic(unique_topic, partitions=2)
        broker.create_topic(unique_topic, partitions=2)  # already there: fine
        _produce_one(broker, unique_topic)
        broker.kill()
        assert not broker.running
        broker.restart()
        assert broker.bootstrap_servers == address
        assert read_topic(address, unique_topic, idle=0.5) == []  # memory storage
        _produce_one(broker, unique_topic)
        assert [r.value for r in read_topic(address, unique_topic, count=1)] == [b"x"]


def test_a_consumer_group_joins_tansu_quickly_with_the_test_settings(tansu: TansuKafka, unique_topic: str) -> None:
    # With librdkafka's defaults the first join takes ~23 s on Tansu (see TEST_CONSUMER_SETTINGS).
    tansu.create_topic(unique_topic)
    _produce_one(tansu, unique_topic)
    consumer = new_consumer(tansu.config, f"g-{unique_topic}", **TEST_CONSUMER_SETTINGS)
    try:
        consumer.subscribe([unique_topic])
        started = time.monotonic()
        message = None
        while message is None and time.monotonic() - started < 10:
            message = consumer.poll(0.1)
        assert message is not None
        assert message.error() is None
        assert message.value() == b"x"
    finally:
        consumer.close()


# -- Celery ----------------------------------------------------------------------------------


def test_celery_worker_runs_a_task_and_stops_cleanly(redis_server: RedisServer, tmp_path: Path) -> None:
    worker = CeleryWorker(
        "harness_app", queues=["harness"], cwd=str(APPS_DIR), env={"CRR_HARNESS_REDIS_URL": redis_server.url},
        log_dir=tmp_path,
    )
    client = Celery("harness-client", broker=redis_server.url, backend=redis_server.url)
    with worker.start():
        result = client.signature("harness_app.add", args=(2, 3)).apply_async(queue="harness")
        assert result.get(timeout=30) == 5
        result.forget()
        assert "harness_app.add" in worker.log_text()
        assert worker.stop() == 0
    client.close()
    assert worker.returncode == 0
    assert "Warm shutdown" in worker.log_text()


def _state(pid: int) -> str:
    """The one-letter state of ``pid`` in /proc (``T``: stopped), or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def test_a_process_with_a_child_is_listed_measured_paused_and_killed_without_it(tmp_path: Path) -> None:
    # A parent that forks one child holding 50 MB, then both sleep: a prefork pool in small.
    script = ("import os, time\nif os.fork() == 0:\n    ballast = bytearray(50 * 2**20)\n"
              "    print('child ready', flush=True)\ntime.sleep(60)\n")
    process = ManagedProcess([sys.executable, "-c", script], name="parent", log_dir=tmp_path).start()
    try:
        process.wait_for_log("child ready", timeout=30)
        (child,) = process.children()
        assert process.rss_kib() > 50 * 1024, "the child's memory counts"
        process.pause()
        wait_until(lambda: _state(process.pid or 0) == _state(child) == "T", 5, what="both stopped")
        process.resume()
        wait_until(lambda: _state(child) in ("S", "R"), 5, what="the child running again")
        process.kill_leader()
        assert not process.running
        assert _state(child) not in ("", "Z"), "the child outlives its parent, an orphan"
    finally:
        process.kill()
    wait_until(lambda: _state(child) in ("", "Z"), 5, what="the orphan killed with its group")
