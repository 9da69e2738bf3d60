"""RetryProducer end to end in real processes: what one process publishes, another reads back intact.

A publisher subprocess (tests/apps/publish_mixed.py) builds thousands of seeded, mixed ops
(every builder, binary and unicode values, huge integers, infinite scores, pipelines,
scripts) and publishes them with RetryProducer; a reader subprocess
(tests/apps/read_topic_raw.py) reads the whole topic with plain confluent-kafka, nothing
from this package. Every op must come back once, equal to the original, under the right
message key, and each key's ops in the order they were published.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import pickle
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from strategies import exact

from celery_redis_retry import message
from celery_redis_retry.ops import EMPTY_CONTEXT, RedisOp
from celery_redis_retry.testing import KafkaBroker

APPS_DIR = Path(__file__).parent / "apps"
SEED = 20261122

pytestmark = pytest.mark.slow


def _run(script: str, *args: str, timeout: float) -> str:
    done = subprocess.run(
        [sys.executable, str(APPS_DIR / script), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{script} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def _original(fields: dict[str, Any]) -> RedisOp:
    context = fields.pop("context")
    return RedisOp(**fields, context=MappingProxyType(context) if context else EMPTY_CONTEXT)


def _publish_and_read_back(broker: KafkaBroker, topic: str, count: int, tmp_path: Path) -> None:
    published, read = tmp_path / "published.pickle", tmp_path / "read.jsonl"
    _run(
        "publish_mixed.py", "--bootstrap", broker.bootstrap_servers, "--topic", topic, "--count", str(count),
        "--seed", str(SEED), "--spool", str(tmp_path / "spool.sqlite3"), "--out", str(published), timeout=120,
    )
    _run("read_topic_raw.py", "--bootstrap", broker.bootstrap_servers, "--topic", topic, "--out", str(read),
         timeout=120)

    with published.open("rb") as source:
        dump = pickle.load(source)  # noqa: S301 - written by our own publisher process just now
    originals = [_original(fields) for fields in dump["ops"]]
    lines = [json.loads(line) for line in read.read_text().splitlines()]
    watermarks, records = lines[-1]["watermarks"], lines[:-1]

    # The whole topic is what was published: nothing trimmed, lost or added.
    assert all(low == 0 for low, _ in watermarks.values()), watermarks
    assert sum(high for _, high in watermarks.values()) == count
    assert len(records) == count
    assert len({(r["p"], r["o"]) for r in records}) == count

    by_id = {op.id: op for op in originals}
    assert len(by_id) == count, "op ids must be unique"
    seen: set[str] = set()
    for record in records:
        raw = base64.b64decode(record["v"])
        decoded = message.decode(raw)
        original = by_id[decoded.id]
        assert decoded.id not in seen, f"op {decoded.id} read twice"
        seen.add(decoded.id)
        assert decoded == original
        assert exact(decoded) == exact(original)  # types, int sizes, float signs too
        assert raw == message.encode(original)
        assert base64.b64decode(record["k"]) == message.message_key(original)
    assert seen == set(by_id)

    # Per message key: one partition, and the publish order.
    published_order: dict[bytes, list[str]] = defaultdict(list)
    for op in originals:
        published_order[message.message_key(op)].append(op.id)
    kafka_order: dict[bytes, list[tuple[int, int, str]]] = defaultdict(list)
    for record in records:
        kafka_order[base64.b64decode(record["k"])].append(
            (record["p"], record["o"], json.loads(base64.b64decode(record["v"]))["id"])
        )
    assert kafka_order.keys() == published_order.keys()
    for key, placed in kafka_order.items():
        assert len({partition for partition, _, _ in placed}) == 1, f"key {key!r} spread over partitions"
        assert [op_id for _, _, op_id in sorted(placed)] == published_order[key], f"key {key!r} out of order"
    # Ordering only means something if keys are shared widely.
    assert sum(len(ids) >= count // 100 for ids in published_order.values()) >= 20


def _coverage(originals: list[RedisOp]) -> dict[str, bool]:
    names = {str(c[0]) for op in originals for c in op.commands}
    args = [a for op in originals for c in op.commands for a in c[1:]] + [a for op in originals for a in op.args]
    return {
        "kinds": {op.kind for op in originals} == {"command", "pipeline", "script"},
        "transactions": {op.transaction for op in originals if op.kind == "pipeline"} == {True, False},
        "commands": {"SET", "DEL", "HSET", "HDEL", "SADD", "SREM", "ZADD", "PEXPIREAT", "INCRBY", "LPUSH", "RPUSH",
                     "HINCRBY", "PFADD", "XADD", "ZINCRBY", "HINCRBYFLOAT"} <= names,
        "set options": {"PXAT", "NX", "XX", "KEEPTTL"} <= {a for a in args if isinstance(a, str)},
        "binary": any(isinstance(a, bytes) and a and not _utf8(a) for a in args),
        "empty": b"" in args and "" in args,
        "unicode": any(isinstance(a, str) and not a.isascii() for a in args),
        "huge ints": any(type(a) is int and abs(a) >= 2**64 for a in args),
        "inf": math.inf in args and -math.inf in args,
        "context, source, error, deadline, retries, target": all(
            any(test(op) for op in originals) for test in (
                lambda op: op.context, lambda op: op.source, lambda op: op.error, lambda op: op.deadline,
                lambda op: op.max_retries is not None, lambda op: op.target != "default",
            )
        ),
    }


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def test_the_publisher_covers_every_builder() -> None:
    # Without Kafka: the generator alone, so a lost builder shows up here by name. Same
    # seed as the publishing tests, whose first 2,000 ops are exactly these.
    spec = importlib.util.spec_from_file_location("publish_mixed", APPS_DIR / "publish_mixed.py")
    assert spec is not None
    assert spec.loader is not None
    publisher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(publisher)
    generator = publisher.Generator(SEED)
    coverage = _coverage([generator.op() for _ in range(2000)])
    assert all(coverage.values()), {name: ok for name, ok in coverage.items() if not ok}


def test_10000_mixed_ops_published_by_one_process_are_read_back_intact_and_in_key_order(
    kafka: KafkaBroker, unique_topic: str, tmp_path: Path
) -> None:
    _publish_and_read_back(kafka, unique_topic, 10_000, tmp_path)


def test_2000_mixed_ops_round_trip_through_tansu(tansu: KafkaBroker, unique_topic: str, tmp_path: Path) -> None:
    tansu.create_topic(unique_topic)
    _publish_and_read_back(tansu, unique_topic, 2_000, tmp_path)
