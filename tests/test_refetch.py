"""The bridge reads ops in flight again from Kafka to hand them over again (it keeps no copy)."""

from __future__ import annotations

import pytest

from celery_redis_retry import kafka
from celery_redis_retry.bridge.refetch import Refetcher
from celery_redis_retry.testing import EmbeddedKafka


def _publish(broker: EmbeddedKafka, topic: str, values: list[bytes], partition: int) -> list[int]:
    """Write ``values`` to one partition; return their offsets."""
    producer = kafka.new_producer(broker.config)
    offsets: list[int] = []
    for value in values:
        producer.produce(topic, value, partition=partition,
                         on_delivery=lambda err, msg: offsets.append(msg.offset()) if err is None else None)
    assert producer.flush(10) == 0
    return sorted(offsets)


@pytest.mark.slow  # uses the embedded Kafka
def test_ops_are_read_again_at_their_positions_and_missing_ones_are_left_out(
    kafka: EmbeddedKafka, unique_topic: str
) -> None:
    kafka.create_topic(unique_topic, partitions=2)
    first = _publish(kafka, unique_topic, [b"a0", b"a1", b"a2", b"a3"], partition=0)
    second = _publish(kafka, unique_topic, [b"b0", b"b1"], partition=1)
    refetcher = Refetcher(kafka.config, f"group-{unique_topic}")
    try:
        wanted = [(unique_topic, 0, first[1]), (unique_topic, 0, first[3]), (unique_topic, 1, second[0])]
        beyond = (unique_topic, 1, second[1] + 50)  # never written: not found, and not waited for
        found = refetcher.read([*wanted, beyond], timeout=10.0)
        assert found == {wanted[0]: b"a1", wanted[1]: b"a3", wanted[2]: b"b0"}
        # Read twice: the client is reused, its assignment replaced.
        assert refetcher.read([(unique_topic, 0, first[0])]) == {(unique_topic, 0, first[0]): b"a0"}
        assert refetcher.read([]) == {}
    finally:
        refetcher.close()
