"""A bridge given a stable ``--name`` joins its group as a static member (``group.instance.id``)."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable

import pytest
from loop_stack import LoopStack

from celery_redis_retry import ops
from celery_redis_retry.errors import ConfigurationError
from celery_redis_retry.kafka import static_membership
from celery_redis_retry.names import EXIT_CONFIG


def test_a_named_bridge_is_a_static_member_of_host_and_name() -> None:
    assert static_membership({}, "bridge-1", host="node-a") == {"group.instance.id": "node-a.bridge-1"}
    assert static_membership({}, "b") == {"group.instance.id": f"{socket.gethostname()}.b"}
    assert static_membership({}, None) == {}


def test_the_users_own_instance_id_wins_and_kip_848_groups_get_none() -> None:
    assert static_membership({"group.instance.id": "mine"}, "bridge-1") == {}
    # Measured (benchmarks/bench_join.py): a KIP-848 static member restarted after a stop is refused.
    assert static_membership({"group.protocol": "consumer"}, "bridge-1") == {}
    assert static_membership({"group.protocol": "classic"}, "bridge-1", host="h") == {"group.instance.id": "h.bridge-1"}


@pytest.mark.parametrize("name", ["", "with space", "a/b", "x" * 101])
def test_a_name_that_cannot_be_an_instance_id_is_refused_naming_it(name: str) -> None:
    with pytest.raises(ConfigurationError, match="bridge name"):
        static_membership({}, name)


@pytest.mark.slow
def test_a_named_bridge_joins_as_that_static_member_and_hands_ops_over(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop()
    stack.publish_all([ops.set("static:1", "v")])
    stack.start_worker(concurrency=1)
    bridge = stack.start_bridge("--name", "bridge-a")
    bridge.wait_for_log(re.escape(f"(static member {socket.gethostname()}.bridge-a)"), timeout=60)
    stack.wait_for(lambda: stack.client().get("static:1") == b"v", 60, "the op applied")


@pytest.mark.slow
def test_the_bridge_refuses_a_bad_name_with_the_configuration_exit_code(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop()
    result = stack.cli("redis-retry", "bridge", "--name", "no spaces please")
    assert result.returncode == EXIT_CONFIG, result.stdout + result.stderr
    assert "bridge name 'no spaces please'" in result.stderr
