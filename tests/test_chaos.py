"""Seeded chaos with full accounting: every fault type at random points, every write accounted for.

The whole system runs as real processes on a 3-broker Apache Kafka cluster: three targets
(a plain redis-server, a Sentinel-managed master with its replica, a Redis Cluster of three
masters with a replica each), a Celery broker, two workers, two bridges and a publishing
app that writes the ledger (tests/chaos/). Faults (tests/chaos/faults.py): SIGKILL of a
bridge, a worker's pool process, a worker's main process, the plain target, the Celery
broker, the app, a Kafka leader, a Kafka follower and the whole Kafka cluster; SIGSTOP of a
bridge past its session timeout and of a worker past the broker's visibility timeout; a
Sentinel failover and a cluster failover. At the end every write of the ledger is looked for
in Redis and the DLQ: none lost, none applied twice, no newer write overwritten.

``CRR_CHAOS_PROFILE`` picks the profile (tests/chaos/run.py): ``short`` (the default, in
``make test``), ``long`` (``make chaos``), ``soak`` (``make soak``). ``CRR_CHAOS_SEED``
replays a seed (``random``: a new one); ``CRR_CHAOS_REPORT`` is where the report goes
(markdown and JSON; default: the run's temporary folder, printed).

The RabbitMQ run plays only the faults that involve the Celery broker: the others do not
depend on which broker Celery uses.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chaos.run import Run, profile_for
from chaos.stack import GROUP_SETTINGS, ChaosStack, extra_env
from loop_stack import LoopStack

from celery_redis_retry.testing import ApacheKafka, RabbitMQServer, RedisCluster, RedisSentinel

pytestmark = pytest.mark.slow

#: The seed ``make test`` plays; ``CRR_CHAOS_SEED=random`` draws a new one.
DEFAULT_SEED = 20261204
PROFILE = os.environ.get("CRR_CHAOS_PROFILE", "short")
#: Comma-separated fault names: play only those (to chase one kind of fault).
ONLY = os.environ.get("CRR_CHAOS_FAULTS", "")
BROKERS = [b for b in ("redis", "rabbitmq") if os.environ.get("CRR_CHAOS_BROKER", b) == b]


@pytest.fixture
def chaos_stack(
    make_loop: Callable[..., LoopStack], kafka_cluster: ApacheKafka, tmp_path: Path, request: pytest.FixtureRequest,
) -> Iterator[ChaosStack]:
    broker: str = request.param
    chosen = os.environ.get("CRR_CHAOS_SEED", str(DEFAULT_SEED))
    seed = random.SystemRandom().randrange(1, 2**31) if chosen == "random" else int(chosen)
    rabbitmq = RabbitMQServer(dir=str(tmp_path / "rabbitmq")).start() if broker == "rabbitmq" else None
    sentinel = RedisSentinel(dir=str(tmp_path / "sentinel")).start()
    cluster = RedisCluster(3, replicas=1, dir=str(tmp_path / "cluster")).start()
    loop = make_loop(
        kafka_broker=kafka_cluster, broker_url=rabbitmq.url if rabbitmq else None, max_retries=1000,
        backoff=0.5, backoff_max=4.0, target_args=("--appendfsync", "always"), kafka_settings=GROUP_SETTINGS,
        extra_targets={"sentinel": sentinel.url, "cluster": cluster.url}, extra_env=extra_env(),
    )
    stack = ChaosStack(loop, sentinel, cluster, rabbitmq, seed, profile_for(PROFILE, broker, ONLY).rate)
    try:
        yield stack
    finally:
        stack.stop()
        if rabbitmq is not None:
            rabbitmq.stop()
        if not all(node.running for node in kafka_cluster.nodes):  # a fault cut short: the session's cluster
            kafka_cluster.start()


#: The run's time limit: the long profile and the soak run for most of an hour.
TIMEOUT_S = {"short": 900, "long": 4 * 3600, "soak": 2 * 3600}[PROFILE]


@pytest.mark.timeout(TIMEOUT_S)
@pytest.mark.parametrize("chaos_stack", BROKERS, indirect=True)
def test_chaos_accounts_for_every_write(chaos_stack: ChaosStack, tmp_path: Path) -> None:
    stack = chaos_stack
    profile = profile_for(PROFILE, "rabbitmq" if stack.rabbitmq else "redis", ONLY)
    print(f"\nchaos profile {profile.name}, seed {stack.seed}, {len(profile.fault_types)} fault types")
    for _ in range(2):
        stack.start_worker()
    for _ in range(2):
        stack.start_bridge()
    stack.loop.wait_assigned(stack.bridges[0])
    stack.start_app()
    run = Run(stack, profile, stack.seed)
    run.play()
    result = run.finish()
    folder = Path(os.environ.get("CRR_CHAOS_REPORT") or tmp_path / "report")
    document = run.report(result, folder)
    print((folder / "chaos-report.md").read_text())
    print(f"report: {folder}")
    assert set(document["faults_by_type"]) == set(profile.fault_types), "a fault type was not played"
    assert result.clean, f"seed {stack.seed}: {result.summary()}"
    assert document["recovery_s"]["not_recovered"] == 0, f"seed {stack.seed}: a fault the system did not recover from"
    assert result.certain > 0
