"""How the bridge's loop takes the errors its consumers report (pure unit tests: no client is built)."""

from __future__ import annotations

import pytest

from celery_redis_retry import kafka
from celery_redis_retry.bridge.loop import Bridge


def test_a_fatal_error_event_stops_the_bridge_instead_of_leaving_it_idle() -> None:
    # librdkafka reports a fenced member (KIP-848's "instance ID still used by another
    # member") as an event of code _FATAL whose own fatal flag is not set.
    bridge = Bridge.__new__(Bridge)  # _consumer_error needs none of the clients
    event = kafka.KafkaError(kafka.KafkaError._FATAL, "Broker: The instance ID is still used by another member")
    assert not event.fatal()
    with pytest.raises(kafka.KafkaException, match="instance ID is still used"):
        bridge._consumer_error(event)


def test_the_end_of_a_partition_is_not_an_error() -> None:
    bridge = Bridge.__new__(Bridge)
    bridge._consumer_error(kafka.KafkaError(kafka.KafkaError._PARTITION_EOF))  # returns quietly
