"""examples/profile_service end to end: its real worker and bridge, its Flask handlers, a Redis outage.

The worker and the bridge run as the example's README starts them (``celery -A
profile_service.celery_app ...`` from examples/), on the session's embedded Kafka. The
HTTP calls go through Flask's test client in this process, so the handlers' writes are
captured by this process's producer exactly as they would be in the served app.
"""

from __future__ import annotations

import importlib
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_redis_retry.testing import (
    CeleryCommand,
    CeleryWorker,
    EmbeddedKafka,
    RedisServer,
    free_port,
    read_topic,
    wait_until,
)

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture
def service(
    kafka: EmbeddedKafka, redis_factory: Callable[..., RedisServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, Any]]:
    # The target keeps what it acknowledged across the kill (appendfsync always).
    target = redis_factory(free_port(), args=("--appendonly", "yes", "--appendfsync", "always"))
    broker = redis_factory()
    name = uuid.uuid4().hex[:8]
    env = {
        "CELERY_BROKER_URL": broker.url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "PROFILE_REDIS_URL": target.url,
        "REDIS_RETRY_TOPIC": f"profiles-{name}",
        "REDIS_RETRY_CONSUMER_GROUP": f"profiles-{name}",
        "REDIS_RETRY_SPOOL_PATH": str(tmp_path / "spool.sqlite3"),
    }
    worker = CeleryWorker("profile_service.celery_app", queues=["redis-retry"], env=env, cwd=str(EXAMPLES),
                          log_dir=tmp_path)
    bridge = CeleryCommand("profile_service.celery_app", ["redis-retry", "bridge"], env=env, cwd=str(EXAMPLES),
                           log_dir=tmp_path)
    # The bridge finds the topic at its next metadata refresh once the first capture created it.
    with bridge.start(ready_pattern=r"bridge consuming", timeout=90), worker.start(timeout=120):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.syspath_prepend(str(EXAMPLES))
        for module in [m for m in sys.modules if m.startswith("profile_service")]:
            monkeypatch.delitem(sys.modules, module)
        web = importlib.import_module("profile_service.web")
        import celery_redis_retry

        yield {"client": web.app.test_client(), "target": target, "env": env, "worker": worker, "bridge": bridge}
        celery_redis_retry.default_producer().close(5)


def test_writes_made_while_redis_is_down_are_applied_when_it_is_back(service: dict[str, Any],
                                                                       kafka: EmbeddedKafka) -> None:
    http, target = service["client"], service["target"]
    response = http.put("/users/1", json={"name": "Ada", "plan": "pro"})
    assert (response.status_code, response.json["status"]) == (200, "done")
    assert http.post("/users/1/visits").status_code == 200

    target.kill()
    response = http.put("/users/7", json={"name": "Grace", "email": "grace@example.org", "plan": "team"})
    assert (response.status_code, response.json["status"]) == (202, "accepted")
    for _ in range(3):
        assert http.post("/users/7/visits").status_code == 202
    assert http.post("/users/1/visits").status_code == 202
    assert http.get("/users/7").status_code == 503  # reads are never captured

    target.start()

    def applied() -> dict[str, Any] | None:
        seven, one = http.get("/users/7"), http.get("/users/1")
        if seven.status_code == 200 and seven.json["visits"] == 3 and one.json["visits"] == 2:
            return {"7": seven.json, "1": one.json}
        return None

    try:
        found = wait_until(applied, 90, interval=0.25, what="the captured writes applied")
    except TimeoutError as exc:
        logs = "\n".join(f"--- {p.log_path}\n{p.log_tail(30)}" for p in (service["worker"], service["bridge"]))
        raise AssertionError(f"{exc}\n{logs}") from exc
    assert found["7"]["profile"] == {"name": "Grace", "email": "grace@example.org", "plan": "team"}
    assert found["1"]["profile"] == {"name": "Ada", "plan": "pro"}
    with target.client() as r:
        assert 0 < r.ttl("cache:user:7") <= 300
        assert r.hgetall("user:7") == {b"name": b"Grace", b"email": b"grace@example.org", b"plan": b"team"}
    dlq = f"{service['env']['REDIS_RETRY_TOPIC']}.dlq"
    assert read_topic(kafka.bootstrap_servers, dlq, idle=2) == []
