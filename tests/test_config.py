"""Settings: the documented defaults, one clear error per bad key, the broker check, caching on the app."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import pytest
from celery import Celery

from celery_redis_retry import ops
from celery_redis_retry.config import Settings, check_broker_visibility, settings_for
from celery_redis_retry.errors import CommandNotAllowedError, ConfigurationError, UnknownTargetError
from celery_redis_retry.message import Signer
from celery_redis_retry.policy import Backoff
from celery_redis_retry.redis_commands import DEFAULT_ALLOWED

MINIMAL: dict[str, Any] = {
    "redis_retry_kafka": {"bootstrap.servers": "kafka:9092"},
    "redis_retry_targets": {"default": "redis://localhost:6379/0"},
}


def settings(**changes: Any) -> Settings:
    conf = {**MINIMAL, **{f"redis_retry_{key}": value for key, value in changes.items()}}
    return Settings.from_mapping(conf)


def refused(**changes: Any) -> str:
    """The ConfigurationError message for MINIMAL with ``changes`` (None removes a key)."""
    conf = {**MINIMAL, **{f"redis_retry_{key}": value for key, value in changes.items()}}
    conf = {key: value for key, value in conf.items() if value is not None}
    with pytest.raises(ConfigurationError) as info:
        Settings.from_mapping(conf)
    assert info.value.reason == "configuration"
    return str(info.value)


@pytest.fixture(autouse=True)
def state_home(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    return str(tmp_path)


# -- defaults ----------------------------------------------------------------------------


def test_minimal_mapping_gives_the_documented_defaults(state_home: str) -> None:
    s = settings()
    assert s.topic == "redis-retry-queue"
    assert s.dlq_topic == "redis-retry-queue.dlq"
    assert s.consumer_group == "redis-retry-consumer-group"
    assert s.queue == "redis-retry"
    assert s.max_retries == 3
    assert s.backoff == Backoff(factor=1.0, maximum=600.0, jitter=True)
    assert dict(s.kafka) == {"bootstrap.servers": "kafka:9092"}
    assert dict(s.targets) == {"default": "redis://localhost:6379/0"}
    assert dict(s.scripts) == {}
    assert dict(s.signing_keys) == {}
    assert s.signer is None
    assert s.allowed_commands == DEFAULT_ALLOWED
    assert s.spool_path == os.path.join(state_home, "celery-redis-retry", "redis-retry-queue.spool.sqlite3")
    assert s.max_message_bytes == 1_000_000
    # The dataclass defaults say the same as the reader does.
    assert s == Settings(kafka=s.kafka, targets=s.targets, spool_path=s.spool_path,
                         scripts=s.scripts, signing_keys=s.signing_keys)


def test_each_default_is_given_in_one_place() -> None:
    from celery_redis_retry.config import DEFAULTS, KEYS, WITHOUT_DEFAULT, backoff_keys

    defaults = {spec.name: spec.default_factory() if spec.default_factory is not dataclasses.MISSING
                else spec.default for spec in dataclasses.fields(Settings)}
    # The backoff keys say what Backoff's own defaults are: Backoff() is the Settings default.
    assert defaults["backoff"] == Backoff()
    assert {k: DEFAULTS[k] for k in backoff_keys(Backoff())} == backoff_keys(Backoff())
    assert backoff_keys(Backoff()) == {"redis_retry_backoff": True, "redis_retry_backoff_max": 600,
                                       "redis_retry_jitter": True}
    # Every other key's default is its field's default (None where the field holds what None means).
    derived = {"redis_retry_allowed_commands": DEFAULT_ALLOWED, "redis_retry_spool_path": ""}
    for key, value in DEFAULTS.items():
        if key not in backoff_keys(Backoff()):
            field_default = defaults[key.removeprefix("redis_retry_")]
            assert field_default == derived.get(key, value), key
    assert set(DEFAULTS) | set(WITHOUT_DEFAULT) == KEYS
    assert {f"redis_retry_{name}" for name in defaults} - {"redis_retry_backoff"} <= KEYS
    # And the default names (topic, group, queue) are written once in the code that reads the settings.
    from pathlib import Path

    from celery_redis_retry import policy
    from celery_redis_retry.config import settings as config_settings

    source = Path(config_settings.__file__).read_text() + Path(policy.__file__).read_text()
    names = [value for value in DEFAULTS.values() if isinstance(value, str) and "-" in value]
    assert {name: source.count(f'"{name}"') for name in names} == dict.fromkeys(names, 1)
    # A Settings built by hand derives its topics as the reader does.
    built = Settings(kafka={}, targets={}, topic="orders")
    assert (built.dlq_topic, built.ends_topic) == ("orders.dlq", "orders.ends")


def test_dlq_topic_and_spool_follow_the_topic(state_home: str) -> None:
    s = settings(topic="orders-retry")
    assert s.dlq_topic == "orders-retry.dlq"
    assert s.spool_path.endswith("orders-retry.spool.sqlite3")
    assert settings(topic="a", dlq_topic="b").dlq_topic == "b"


def test_explicit_values_are_kept() -> None:
    s = settings(
        consumer_group="g", queue="q", max_retries=0, backoff=5, backoff_max=60, jitter=False,
        scripts={"cas": "return 1"}, signing_keys={"k1": "s" * 16, "k2": b"t" * 32},
        allowed_commands=["set", "DEL"], spool_path="/tmp/spool",
    )
    assert (s.consumer_group, s.queue, s.max_retries, s.spool_path) == ("g", "q", 0, "/tmp/spool")
    assert s.backoff == Backoff(factor=5.0, maximum=60.0, jitter=False)
    assert dict(s.signing_keys) == {"k1": b"s" * 16, "k2": b"t" * 32}
    assert isinstance(s.signer, Signer)
    assert s.signer.key_id == "k1"
    assert s.allowed_commands == frozenset({"SET", "DEL"})
    assert settings(backoff=False).backoff.factor is None
    assert settings(backoff=True).backoff.factor == 1.0


def test_settings_are_frozen() -> None:
    s = settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.topic = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.targets["evil"] = "redis://evil"  # type: ignore[index]
    with pytest.raises(TypeError):
        s.kafka["bootstrap.servers"] = "evil:9092"  # type: ignore[index]


# -- every bad key is named ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"kafka": None}, ["redis_retry_kafka is required"]),
        ({"kafka": "kafka:9092"}, ["redis_retry_kafka must be a dict"]),
        ({"kafka": {}}, ["redis_retry_kafka", "bootstrap.servers"]),
        ({"kafka": {"bootstrap.servers": ""}}, ["redis_retry_kafka", "bootstrap.servers"]),
        ({"targets": None}, ["redis_retry_targets is required"]),
        ({"targets": ["redis://x"]}, ["redis_retry_targets must be a dict"]),
        ({"targets": {"main": "redis://x"}}, ["redis_retry_targets", "'default'"]),
        ({"targets": {"default": "http://x:6379"}}, ["redis_retry_targets['default']", "'http://x:6379'"]),
        ({"targets": {"default": "redis://x", "s": "localhost:6379"}}, ["redis_retry_targets['s']"]),
        ({"targets": {"default": 6379}}, ["redis_retry_targets['default']"]),
        ({"targets": {"default": "redis://x", "": "redis://y"}}, ["redis_retry_targets keys"]),
        ({"topic": ""}, ["redis_retry_topic must be a non-empty string"]),
        ({"dlq_topic": 5}, ["redis_retry_dlq_topic"]),
        ({"consumer_group": ""}, ["redis_retry_consumer_group"]),
        ({"queue": ["q"]}, ["redis_retry_queue"]),
        ({"max_retries": -1}, ["redis_retry_max_retries must be an integer >= 0, got -1"]),
        ({"max_retries": "3"}, ["redis_retry_max_retries", "'3'"]),
        ({"max_retries": True}, ["redis_retry_max_retries", "True"]),
        ({"max_retries": 2.0}, ["redis_retry_max_retries"]),
        ({"backoff": "fast"}, ["redis_retry_backoff must be True, False or a positive number", "'fast'"]),
        ({"backoff": 0}, ["redis_retry_backoff", "got 0"]),
        ({"backoff": -1.5}, ["redis_retry_backoff", "got -1.5"]),
        ({"backoff_max": 0}, ["redis_retry_backoff_max must be a positive number"]),
        ({"backoff_max": "600"}, ["redis_retry_backoff_max"]),
        ({"backoff_max": False}, ["redis_retry_backoff_max"]),
        ({"jitter": "yes"}, ["redis_retry_jitter must be True or False"]),
        ({"scripts": {"cas": ""}}, ["redis_retry_scripts['cas']"]),
        ({"scripts": {"cas": b"return 1"}}, ["redis_retry_scripts['cas']"]),
        ({"scripts": "return 1"}, ["redis_retry_scripts must be a dict"]),
        ({"signing_keys": {"k1": "short"}}, ["redis_retry_signing_keys['k1']", "16 bytes"]),
        ({"signing_keys": {"k1": b"x" * 15}}, ["redis_retry_signing_keys['k1']"]),
        ({"signing_keys": {"k1": 1234567890123456789}}, ["redis_retry_signing_keys['k1']"]),
        ({"signing_keys": {"bad id": "x" * 32}}, ["redis_retry_signing_keys", "'bad id'"]),
        ({"allowed_commands": ["SET", "GET"]}, ["redis_retry_allowed_commands", "GET"]),
        ({"allowed_commands": ["FLUSHALL", "EVAL"]}, ["redis_retry_allowed_commands", "EVAL, FLUSHALL"]),
        ({"allowed_commands": "SET"}, ["redis_retry_allowed_commands must be a list"]),
        ({"allowed_commands": [b"SET"]}, ["redis_retry_allowed_commands must be a list"]),
        ({"allowed_commands": 5}, ["redis_retry_allowed_commands must be a list"]),
        ({"allowed_commands": {"SET": True}}, ["redis_retry_allowed_commands must be a list"]),
        ({"spool_path": ""}, ["redis_retry_spool_path"]),
        ({"spool_max_bytes": 1024}, ["redis_retry_spool_max_bytes", ">= 65536"]),
        ({"durable_publish": 1}, ["redis_retry_durable_publish must be True or False"]),
        ({"max_message_bytes": 10}, ["redis_retry_max_message_bytes"]),
        ({"dedupe_ttl": 0}, ["redis_retry_dedupe_ttl"]),
        ({"batch_size": 0}, ["redis_retry_batch_size"]),
        ({"batch_linger_ms": -1}, ["redis_retry_batch_linger_ms"]),
    ],
)
def test_bad_or_missing_keys_are_named(changes: dict[str, Any], words: list[str]) -> None:
    message = refused(**changes)
    for word in words:
        assert word in message


def test_allowed_commands_may_be_any_iterable() -> None:
    assert settings(allowed_commands=(name for name in ["set", "del"])).allowed_commands == {"SET", "DEL"}
    assert settings(allowed_commands=("SET",)).allowed_commands == {"SET"}
    assert settings(allowed_commands={"HSET"}).allowed_commands == {"HSET"}


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "redis://:secret@redis.internal:6380/2",
        "rediss://user:secret@redis.example.com:6380/0",
        "unix:///var/run/redis/redis.sock?db=1",
        "redis+sentinel://sentinel-1:26379,sentinel-2:26379/mymaster/0",
        "rediss+sentinel://sentinel-1:26379/mymaster",
        "redis+cluster://node-1:7000,node-2:7001",
        "rediss+cluster://node-1:7000",
    ],
)
def test_every_documented_target_url_form_is_accepted(url: str) -> None:
    assert settings(targets={"default": url, "other": url}).targets["other"] == url


# -- the broker's visibility timeout ---------------------------------------------------------


@pytest.mark.parametrize(
    "broker_url",
    [
        "redis://localhost:6379/0",
        "rediss://localhost:6380/0",
        "sentinel://s1:26379;sentinel://s2:26379",
        "redis://a:6379/0;redis://b:6379/0",
        "sqs://",
    ],
)
def test_backoff_cap_at_the_visibility_timeout_is_refused(broker_url: str) -> None:
    s = settings(backoff_max=3600)
    with pytest.raises(ConfigurationError) as info:
        check_broker_visibility(s, {"broker_url": broker_url})
    assert "redis_retry_backoff_max (3600 s)" in str(info.value)
    assert "visibility_timeout'] (3600 s)" in str(info.value)
    check_broker_visibility(settings(backoff_max=3599), {"broker_url": broker_url})


def test_visibility_timeout_from_transport_options() -> None:
    conf = {"broker_url": "redis://localhost", "broker_transport_options": {"visibility_timeout": 300}}
    with pytest.raises(ConfigurationError, match=r"redis_retry_backoff_max .*visibility_timeout"):
        check_broker_visibility(settings(), conf)  # the default cap, 600 s, is above 300 s
    check_broker_visibility(settings(backoff_max=299), conf)
    check_broker_visibility(settings(backoff_max=86_400),
                            {"broker_url": "redis://x", "broker_transport_options": {"visibility_timeout": 90_000}})


@pytest.mark.parametrize("conf", [{"broker_url": "amqp://guest@localhost//"}, {"broker_url": "pyamqp://x"},
                                  {"broker_url": None}, {}])
def test_brokers_without_visibility_timeout_accept_any_cap(conf: dict[str, Any]) -> None:
    check_broker_visibility(settings(backoff_max=1_000_000), conf)


# -- read once from a real Celery app --------------------------------------------------------


def make_app(**conf: Any) -> Celery:
    app = Celery("test_config", set_as_current=False)
    app.conf.update({**MINIMAL, **conf})
    return app


def test_settings_for_reads_once_and_caches_on_the_app() -> None:
    app = make_app(redis_retry_topic="from-app", redis_retry_max_retries=7)
    first = settings_for(app)
    assert (first.topic, first.max_retries, first.dlq_topic) == ("from-app", 7, "from-app.dlq")
    app.conf.redis_retry_topic = "changed-later"
    assert settings_for(app) is first
    other = settings_for(make_app())
    assert other is not first
    assert other.topic == "redis-retry-queue"


def test_settings_for_fails_at_startup_naming_the_key() -> None:
    app = Celery("bad", set_as_current=False)
    app.conf.update(redis_retry_kafka={"bootstrap.servers": "k:9092"})
    with pytest.raises(ConfigurationError, match="redis_retry_targets is required"):
        settings_for(app)


def test_settings_for_checks_the_apps_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="visibility_timeout"):
        settings_for(make_app(broker_url="redis://localhost:6379/0", redis_retry_backoff_max=7200))
    assert settings_for(make_app(broker_url="amqp://localhost//", redis_retry_backoff_max=7200)).backoff.maximum \
        == 7200
    # Celery takes the broker from CELERY_BROKER_URL before broker_url: so does the check.
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://from-env:6379/0")
    with pytest.raises(ConfigurationError, match="visibility_timeout"):
        settings_for(make_app(broker_url="amqp://localhost//", redis_retry_backoff_max=7200))


# -- check_op ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conf", "options"),
    [
        ({"broker_url": "amqp://guest@rabbit//"}, {"confirm_publish": True}),
        ({"broker_url": "pyamqp://guest@rabbit//", "broker_transport_options": {"max_retries": 2}},
         {"max_retries": 2, "confirm_publish": True}),
        ({"broker_url": "amqps://rabbit//", "broker_transport_options": {"confirm_publish": False}},
         {"confirm_publish": False}),  # the app's own choice stands
        ({"broker_url": "redis://127.0.0.1:6379/1"}, {}),
        ({"broker_url": "memory://"}, {}),
    ],
)
def test_the_bridge_asks_a_rabbitmq_broker_to_confirm_its_task_messages(
    conf: dict[str, Any], options: dict[str, Any]
) -> None:
    from celery_redis_retry.config import confirm_task_publishing

    app = make_app(**conf)
    confirm_task_publishing(app)
    assert dict(app.conf.broker_transport_options or {}) == options


def test_the_broker_url_in_a_message_hides_its_passwords(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery_redis_retry.config import shown_broker_url

    app = make_app(broker_url="amqp://u:s3cret@r1//;amqp://u:s3cret@r2//")
    assert shown_broker_url(app.conf) == "amqp://u:***@r1//;amqp://u:***@r2//"
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:pw@cache:6379/1")  # as the worker reads it
    assert shown_broker_url(make_app(broker_url="memory://").conf) == "redis://:***@cache:6379/1"


def test_check_op_refuses_unknown_targets() -> None:
    s = settings(targets={"default": "redis://a", "sessions": "redis://b"})
    s.check_op(ops.delete("k"))
    s.check_op(ops.delete("k").with_target("sessions"))
    with pytest.raises(UnknownTargetError) as info:
        s.check_op(ops.delete("k").with_target("cache"))
    assert "'cache'" in str(info.value)
    assert "default, sessions" in str(info.value)
    assert info.value.reason == "unknown_target"


def test_check_op_refuses_commands_outside_the_allowlist() -> None:
    s = settings(allowed_commands=["SET", "DEL", "PEXPIREAT"])
    s.check_op(ops.set("k", "v", ex=5))
    s.check_op(ops.expire("k", 5))  # stored as PEXPIREAT
    s.check_op(ops.pipeline([ops.delete("a"), ops.set("b", 1)]))
    op = ops.incrby("n", 1)
    with pytest.raises(CommandNotAllowedError) as info:
        s.check_op(op)
    assert "INCRBY is not in redis_retry_allowed_commands" in str(info.value)
    assert op.id in str(info.value)
    with pytest.raises(CommandNotAllowedError, match="HSET"):
        s.check_op(ops.pipeline([ops.delete("a"), ops.hset("h", "f", "v")]))


# -- librdkafka settings per rebalance protocol ---------------------------------------------


def test_the_consumer_protocol_drops_the_classic_defaults_librdkafka_would_refuse() -> None:
    from celery_redis_retry import kafka

    classic = kafka.consumer_config({"bootstrap.servers": "127.0.0.1:1"}, "g")
    assert classic["partition.assignment.strategy"] == "cooperative-sticky"
    kip848 = kafka.consumer_config({"bootstrap.servers": "127.0.0.1:1", "group.protocol": "consumer"}, "g")
    assert kafka.CLASSIC_PROTOCOL_ONLY.isdisjoint(kip848)
    assert kip848["group.protocol"] == "consumer"
    kafka.Consumer(kip848).close()  # librdkafka accepts it
    # A classic-only key the user set on purpose is theirs: librdkafka refuses it, naming it.
    mistaken = kafka.consumer_config({"group.protocol": "consumer", "session.timeout.ms": 6000}, "g")
    with pytest.raises(kafka.KafkaException, match=r"session\.timeout\.ms"):
        kafka.Consumer(mistaken)
    assert "group.protocol" not in kafka.producer_config({"group.protocol": "consumer"})


# -- the Celery broker on a target's server ---------------------------------------------------


@pytest.mark.parametrize(
    ("broker", "shared"),
    [
        ("redis://localhost:6379/1", ["default"]),
        ("redis://127.0.0.1/2", ["default"]),
        ("redis://127.0.0.1:6380/0", []),
        ("redis://other:1;redis://127.0.0.1:6379/3", ["default"]),
        ("amqp://guest@127.0.0.1:6379//", []),
    ],
)
def test_a_celery_broker_on_a_targets_server_is_warned_about(
    broker: str, shared: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    from celery_redis_retry.config import broker_shared_with_targets

    app = Celery(broker=broker, set_as_current=False)
    app.conf.redis_retry_kafka = {"bootstrap.servers": "127.0.0.1:9092"}
    app.conf.redis_retry_targets = {"default": "redis://127.0.0.1:6379/0", "sessions": "redis://127.0.0.1:7000/0"}
    assert broker_shared_with_targets(Settings.from_mapping(app.conf), app.conf) == shared
    with caplog.at_level("WARNING", logger="celery_redis_retry.config"):
        settings_for(app)
    warned = [r.getMessage() for r in caplog.records if "Celery broker is the Redis server" in r.getMessage()]
    assert len(warned) == len(shared)


# -- keys that are read by nothing -------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "meant"),
    [
        ("redis_retry_max_retry", "redis_retry_max_retries"),
        ("redis_retry_target", "redis_retry_targets"),
        ("redis_retry_dlq_topik", "redis_retry_dlq_topic"),
        ("redis_retry_backof_max", "redis_retry_backoff_max"),
    ],
)
def test_a_misspelled_key_is_refused_naming_the_key_meant(key: str, meant: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        settings_for(make_app(**{key: 5}))
    assert str(info.value) == f"{key} is not a celery_redis_retry setting: did you mean {meant}?"


def test_an_uppercase_key_is_refused_naming_the_lowercase_key() -> None:
    with pytest.raises(ConfigurationError, match=r"REDIS_RETRY_MAX_RETRIES is not read: the settings are lowercase, "
                                                 r"write redis_retry_max_retries$"):
        settings_for(make_app(REDIS_RETRY_MAX_RETRIES=5))
    with pytest.raises(ConfigurationError, match=r"REDIS_RETRY_MAX_RETRY is .*lowercase.*redis_retry_max_retries"):
        settings_for(make_app(REDIS_RETRY_MAX_RETRY=5))


def test_other_keys_and_celerys_own_are_left_alone() -> None:
    # Celery's own setting with our prefix, and unrelated upper-case keys of the app.
    app = make_app(redis_retry_on_timeout=True, TIME_ZONE="UTC", REDIS_URL="redis://x", CELERY_TASK_ALWAYS_EAGER=False)
    assert settings_for(app).max_retries == 3


def test_keys_given_with_a_celery_namespace_are_read() -> None:
    app = Celery("namespaced", set_as_current=False)
    app.config_from_object({
        "CELERY_BROKER_URL": "memory://",
        "CELERY_REDIS_RETRY_KAFKA": {"bootstrap.servers": "kafka:9092"},
        "CELERY_REDIS_RETRY_TARGETS": {"default": "redis://localhost:6379/0"},
        "CELERY_REDIS_RETRY_MAX_RETRIES": 7,
        "DATABASES": {},
    }, namespace="CELERY")
    assert settings_for(app).max_retries == 7
    app.conf.CELERY_REDIS_RETRY_MAX_RETRYS = 1
    with pytest.raises(ConfigurationError, match="did you mean redis_retry_max_retries"):
        Settings.from_mapping(app.conf)


def test_the_known_keys_are_the_documented_ones() -> None:
    from pathlib import Path

    from celery_redis_retry.config import KEYS

    table = Path(__file__).parent.parent.joinpath("docs", "configuration.md").read_text()
    assert set(re.findall(r"^\| `(redis_retry_[a-z_]+)` \|", table, re.MULTILINE)) == KEYS


# -- target URLs, parsed as the replay connects with them ---------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis:/localhost", "must start with redis:// (two slashes)"),
        ("redis://", "has no host"),
        ("redis://cache:99999/0", "Port out of range"),
        ("redis://cache:port/0", "Port could not be cast to integer"),
        ("redis://cache:6379/zero", "database 'zero' must be a number"),
        ("redis://cache:6379?db=x", "Invalid value for 'db'"),
        ("unix://", "has no socket path"),
        ("redis+sentinel://127.0.0.1:26379", "names no service"),
        ("redis+sentinel://127.0.0.1:26379/", "names no service"),
        ("redis+sentinel://127.0.0.1/mymaster", "Sentinel '127.0.0.1' must be HOST:PORT"),
        ("redis+sentinel://s1:26379/mymaster/x", "must be /SERVICE or /SERVICE/DB"),
        ("redis+cluster://", "names no node"),
        ("redis+cluster://node-1:7000/2", "a Redis Cluster has only database 0"),
        ("redis://a:1,b:2/0", "Port could not be cast"),
        ("redis://[::1:6379/0", "is not a URL: Invalid IPv6 URL"),
        ("redis://cache host:6379/0", "the server 'cache host:6379' has a host that is neither a name nor an IP"),
        ("redis://cache:6379/0#replica", "has a fragment '#replica'"),
        ("redis://cache:6379/0?socket_timout=2", "has the unknown option socket_timout (redis-py's Connection"),
        ("redis://cache:6379/0?ssl_cert_reqs=none", "ssl_cert_reqs (redis-py's Connection takes no such argument; "
                                                    "a TLS option needs rediss://)"),
        ("rediss://cache:6379/0?ssl_cert_reqs=sometimes",
         "has an option redis-py refuses: Invalid SSL Certificate Requirements Flag: sometimes"),
        ("redis://cache:6379/0?decode_responses=false", "sets decode_responses in its query, which redis-py would "
                                                        "pass on as text it cannot use"),
        ("rediss://cache:6379/0?retry=3&socket_type=x", "sets retry, socket_type in its query"),
        ("unix://var/run/redis.sock", "names host 'var' (write unix:///path/to/redis.sock, three slashes)"),
        ("unix:///run/redis.sock?db=x", "Invalid value for 'db'"),
        ("redis+sentinel://s1:26379/mymaster?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
        ("rediss+sentinel://s1:26379/mymaster?ssl_cert_reqs=sometimes", "Invalid SSL Certificate Requirements"),
        ("redis+sentinel://s1:26379/mymaster?retries=3", "has the unknown option retries"),
        ("redis+sentinel://s1:26379/mymaster?db=2", "names its database in the query: write it as the path"),
        ("redis+cluster://node-1:7000?socket_connect_timeout=soon", "Invalid value for 'socket_connect_timeout'"),
        ("redis+cluster://node-1:7000?db=2", "names database 2: a Redis Cluster has only database 0"),
        ("redis+cluster://node-1:7000?read_from_replicas=yes", "has the unknown option read_from_replicas"),
    ],
)
def test_a_target_url_no_client_could_use_is_refused_naming_the_target(url: str, problem: str) -> None:
    message = refused(targets={"default": "redis://localhost:6379/0", "sessions": url})
    assert message.startswith("redis_retry_targets['sessions'] ")
    assert problem in message


def test_a_refused_target_url_does_not_show_its_password() -> None:
    message = refused(targets={"default": "redis://:s3cret@cache:6379/zero"})
    assert "s3cret" not in message
    assert "redis://:***@cache:6379/zero" in message
    message = refused(targets={"default": "redis+sentinel://u:p@ss@s1:1,s2:2/m?password=s3cret&db=x"})
    assert "ss@" not in message
    assert "s3cret" not in message
    assert "'redis+sentinel://u:***@s1:1,s2:2/m?password=***&db=x'" in message


@pytest.mark.parametrize(
    "url",
    ["redis://cache:6379/0?socket_timeout=2&client_name=billing&max_connections=50&health_check_interval=10",
     "rediss://cache:6380/0?ssl_cert_reqs=none&ssl_check_hostname=false", "unix:///run/redis.sock?db=2&socket_timeout=1",
     "redis+sentinel://s1:26379/mymaster/1?socket_timeout=2", "rediss+cluster://n1:7000?ssl_cert_reqs=required",
     "redis://[::1]:6379/0", "redis://[fe80::1%eth0]:6379/0", "redis://redis_cache.internal:6379"],
)
def test_target_urls_with_options_redis_py_takes_are_accepted(url: str) -> None:
    assert settings(targets={"default": url}).targets["default"] == url


def test_the_replay_connection_parses_target_urls_as_the_settings_do() -> None:
    from celery_redis_retry.errors import PermanentReplayError
    from celery_redis_retry.targets import connect

    with pytest.raises(PermanentReplayError, match="names no service"):
        connect("redis+sentinel://127.0.0.1:26379")
    sessions = connect("redis+sentinel://127.0.0.1:1,127.0.0.1:2/sessions/3")
    assert (sessions.connection_pool.service_name, sessions.connection_pool.connection_kwargs["db"]) == ("sessions", 3)


def test_a_rediss_sentinel_url_speaks_tls_to_the_sentinels_and_the_master() -> None:
    from redis.connection import SSLConnection
    from redis.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

    from celery_redis_retry.targets import connect

    def connection_classes(url: str) -> tuple[type, type]:
        pool = connect(url).connection_pool
        return pool.connection_class, pool.sentinel_manager.sentinels[0].connection_pool.connection_class

    tls = connect("rediss+sentinel://127.0.0.1:1/m/2?ssl_cert_reqs=none").connection_pool
    assert connection_classes("rediss+sentinel://127.0.0.1:1/m/2?ssl_cert_reqs=none") == (
        SentinelManagedSSLConnection, SSLConnection)
    assert tls.connection_kwargs["ssl_cert_reqs"] == "none"
    assert tls.sentinel_manager.sentinels[0].connection_pool.connection_kwargs["ssl_cert_reqs"] == "none"
    plain, sentinels = connection_classes("redis+sentinel://127.0.0.1:1/m/2")
    assert plain is SentinelManagedConnection
    assert not issubclass(sentinels, SSLConnection)


# -- librdkafka properties, checked without connecting --------------------------------------------


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        ({"acks": "sometimes"},
         "redis_retry_kafka['acks']: " 'Invalid value for configuration property "request.required.acks"'),
        ({"auto.offset.reset": "sometimes"},
         "redis_retry_kafka['auto.offset.reset']: " 'Invalid value "sometimes" for configuration property '
         '"auto.offset.reset"'),
        ({"compression.type": "lz4", "linger.ms": "soon"},
         "redis_retry_kafka['linger.ms']: " 'Invalid value for configuration property "queue.buffering.max.ms"'),
        ({"no.such.property": 1},
         "redis_retry_kafka['no.such.property']: " 'No such configuration property: "no.such.property"'),
        # A combination: refused when the client is created, naming no single key.
        ({"acks": 1}, "redis_retry_kafka: Failed to create producer: `acks` must be set to `all` when "
                      "`enable.idempotence` is true"),
    ],
)
def test_a_librdkafka_property_it_refuses_is_refused_at_once(properties: dict[str, Any], expected: str) -> None:
    assert refused(kafka={"bootstrap.servers": "kafka:9092", **properties}) == expected


def test_the_librdkafka_check_connects_nowhere_takes_milliseconds_and_leaves_no_thread() -> None:
    import select
    import socket
    import time

    with socket.create_server(("127.0.0.1", 0)) as listener:
        kafka = {"bootstrap.servers": f"127.0.0.1:{listener.getsockname()[1]}", "acks": "all", "group.id": "g"}
        settings(kafka=kafka)  # librdkafka's one-time start-up is not what is measured
        threads = len(os.listdir("/proc/self/task"))
        started = time.perf_counter()
        for _ in range(10):
            settings(kafka=kafka)
        each = (time.perf_counter() - started) / 10
        assert len(os.listdir("/proc/self/task")) == threads
        assert each < 0.05, f"{each * 1000:.1f} ms per check"
        readable, _, _ = select.select([listener], [], [], 0.5)
        assert not readable, "the check connected to bootstrap.servers"


# -- install() in an application process ------------------------------------------------------------


def test_install_reads_and_checks_the_settings_at_once() -> None:
    import celery_redis_retry

    with pytest.raises(ConfigurationError, match="redis_retry_max_retry is not a celery_redis_retry setting"):
        celery_redis_retry.install(make_app(redis_retry_max_retry=5))
    with pytest.raises(ConfigurationError, match=r"redis_retry_targets\['default'\] names no service"):
        celery_redis_retry.install(make_app(redis_retry_targets={"default": "redis+sentinel://127.0.0.1:26379"}))


def test_install_checks_a_configuration_source_given_before_it() -> None:
    import celery_redis_retry

    app = Celery("from_object", set_as_current=False)
    app.config_from_object({**MINIMAL, "broker_url": "memory://", "REDIS_RETRY_TARGETS": {}})
    with pytest.raises(ConfigurationError, match="REDIS_RETRY_TARGETS is not read"):
        celery_redis_retry.install(app)


def test_install_checks_updated_keys_without_loading_the_configuration() -> None:
    from kombu import Queue

    import celery_redis_retry
    from celery_redis_retry.capture.guard import use_app

    app = make_app(broker_url="memory://")
    try:
        celery_redis_retry.install(app)
        assert not app.configured
        app.conf.task_queues = [Queue("billing")]  # set after install(): the queue is still added
        assert [q.name for q in app.conf.task_queues] == ["billing", "redis-retry", "redis-retry.critical"]
    finally:
        use_app(None)


def test_install_before_the_configuration_checks_it_once_configured(caplog: pytest.LogCaptureFixture) -> None:
    import celery_redis_retry
    from celery_redis_retry.capture.guard import use_app

    app = Celery("configured_later", set_as_current=False)
    try:
        celery_redis_retry.install(app)  # nothing to read yet: not refused
        app.config_from_object({**MINIMAL, "broker_url": "memory://", "redis_retry_max_retries": 9})
        assert settings_for(app).max_retries == 9
    finally:
        use_app(None)


# -- the real processes refuse to start, in one line ---------------------------------------------------

APPS = os.path.join(os.path.dirname(__file__), "apps")
GOOD_KAFKA = {"bootstrap.servers": "127.0.0.1:1"}
GOOD_TARGETS = {"default": "redis://127.0.0.1:1/0"}
MISTAKES = {
    "misspelled key": ({"redis_retry_max_retry": 5}, "redis_retry_max_retry is not a celery_redis_retry setting: "
                                                     "did you mean redis_retry_max_retries?"),
    "uppercase key": ({"REDIS_RETRY_MAX_RETRIES": 5}, "REDIS_RETRY_MAX_RETRIES is not read: the settings are "
                                                      "lowercase, write redis_retry_max_retries"),
    "sentinel URL without service": (
        {"redis_retry_targets": {"default": "redis+sentinel://127.0.0.1:26379"}},
        "redis_retry_targets['default'] names no service (write redis+sentinel://HOST:PORT/SERVICE/DB), "
        "got 'redis+sentinel://127.0.0.1:26379'"),
    "librdkafka value": ({"redis_retry_kafka": {**GOOD_KAFKA, "acks": "sometimes"}},
                         "redis_retry_kafka['acks']: "
                         'Invalid value for configuration property "request.required.acks"'),
}


def _settings_env(conf: dict[str, Any]) -> dict[str, str]:
    import json

    return {"CRR_SETTINGS": json.dumps({"redis_retry_kafka": GOOD_KAFKA, "redis_retry_targets": GOOD_TARGETS, **conf})}


def _one_line_refusal(log: str, line: str, *, code: int = 3) -> None:
    assert f"exited with code {code}" in log
    assert line in log.splitlines()
    assert "Traceback" not in log


@pytest.mark.slow
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_celery_worker_refuses_to_start_in_one_line(mistake: str, tmp_path: Any) -> None:
    from celery_redis_retry.testing import CeleryWorker, ProcessExitedError

    conf, message = MISTAKES[mistake]
    worker = CeleryWorker("settings_app", queues=["redis-retry"], cwd=APPS, env=_settings_env(conf),
                          log_dir=tmp_path)
    with pytest.raises(ProcessExitedError) as failure:
        worker.start(timeout=60)
    _one_line_refusal(str(failure.value), f"celery_redis_retry: configuration error: {message}")


@pytest.mark.slow
def test_celery_worker_refuses_a_metrics_port_in_use_in_one_line(tmp_path: Any) -> None:
    import socket

    from celery_redis_retry.testing import CeleryWorker, ProcessExitedError

    with socket.create_server(("", 0)) as taken:
        port = taken.getsockname()[1]
        worker = CeleryWorker("settings_app", queues=["redis-retry"], cwd=APPS, log_dir=tmp_path,
                              env=_settings_env({"redis_retry_worker_metrics_port": port}))
        with pytest.raises(ProcessExitedError) as failure:
            worker.start(timeout=60)
    log = str(failure.value)
    assert f"celery_redis_retry: configuration error: cannot serve metrics on port {port}" in log
    _one_line_refusal(log, next(line for line in log.splitlines() if line.startswith("celery_redis_retry: ")))


@pytest.mark.slow
def test_celery_worker_with_good_settings_starts(tmp_path: Any) -> None:
    from celery_redis_retry.testing import CeleryWorker

    with CeleryWorker("settings_app", queues=["redis-retry"], cwd=APPS, env=_settings_env({}), log_dir=tmp_path):
        pass  # ready: the app module and the boot steps passed


@pytest.mark.slow
@pytest.mark.parametrize("mistake", ["misspelled key", "librdkafka value"])
def test_the_bridge_refuses_to_start_in_one_line(mistake: str, tmp_path: Any) -> None:
    from celery_redis_retry.testing import CeleryCommand, ProcessExitedError

    conf, message = MISTAKES[mistake]
    bridge = CeleryCommand("settings_app", ["redis-retry", "bridge"], cwd=APPS, env=_settings_env(conf),
                           log_dir=tmp_path)
    with pytest.raises(ProcessExitedError) as failure:
        bridge.start(ready_pattern="never printed", timeout=60)
    _one_line_refusal(str(failure.value), f"configuration error: {message}")


@pytest.mark.slow
def test_the_other_commands_refuse_in_one_line() -> None:
    import subprocess
    import sys

    conf, message = MISTAKES["uppercase key"]
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "settings_app", "redis-retry", "dlq", "list"],
        cwd=APPS, env={**os.environ, **_settings_env(conf)}, capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 3
    assert done.stderr.strip().splitlines()[-1] == f"configuration error: {message}"
    assert "Traceback" not in done.stderr


#: A bad target URL of each kind: (URL, what the refusal says of it).
BAD_TARGET_URLS = {
    "redis": ("redis://cache:6379/zero", "database 'zero' must be a number (the path is /DB)"),
    "rediss": ("rediss://:s3cret@cache:99999/0", "Port out of range 0-65535"),
    "unix": ("unix://var/run/redis.sock", "names host 'var' (write unix:///path/to/redis.sock, three slashes)"),
    "sentinel": ("redis+sentinel://127.0.0.1:26379", "names no service (write redis+sentinel://HOST:PORT/SERVICE/DB)"),
    "cluster": ("redis+cluster://127.0.0.1:7000/2", "names database 2: a Redis Cluster has only database 0"),
    "bad query parameter": ("redis+sentinel://127.0.0.1:26379/mymaster?socket_timeout=abc",
                            "Invalid value for 'socket_timeout' in connection URL"),
}
#: Seconds a `celery` process takes to import the app and refuse it (about 2 on an idle machine).
REFUSED_WITHIN_S = 30


def _worker_and_bridge_refuse(conf: dict[str, Any], line: str) -> None:
    """Start ``celery worker`` and ``redis-retry bridge`` with ``conf`` and check that each
    exits 3 at startup with ``line``, having connected to neither Kafka nor the Celery broker."""
    import select
    import socket
    import subprocess
    import sys
    import time

    with socket.create_server(("127.0.0.1", 0)) as kafka, socket.create_server(("127.0.0.1", 0)) as broker:
        env = {**os.environ, **_settings_env({
            "redis_retry_kafka": {"bootstrap.servers": f"127.0.0.1:{kafka.getsockname()[1]}"},
            "broker_url": f"redis://127.0.0.1:{broker.getsockname()[1]}/0", **conf})}
        commands = {
            "worker": (["worker", "-Q", "redis-retry", "-P", "solo", "-l", "INFO"], "celery_redis_retry: "),
            "bridge": (["redis-retry", "bridge"], ""),
        }
        started = time.monotonic()
        running = {name: subprocess.Popen([sys.executable, "-m", "celery", "-A", "settings_app", *argv], cwd=APPS,
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                   for name, (argv, _) in commands.items()}
        for name, process in running.items():
            output, _ = process.communicate(timeout=REFUSED_WITHIN_S)
            took = time.monotonic() - started
            assert process.returncode == 3, f"{name} exited {process.returncode}:\n{output}"
            assert took < REFUSED_WITHIN_S
            expected = f"{commands[name][1]}configuration error: {line}"
            assert [text for text in output.splitlines() if "configuration error" in text] == [expected], output
            assert "Traceback" not in output
            assert "s3cret" not in output
        readable, _, _ = select.select([kafka, broker], [], [], 0)
        assert not readable, "a refused process connected to Kafka or to the Celery broker"


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(BAD_TARGET_URLS))
def test_worker_and_bridge_refuse_a_bad_target_url_at_startup(kind: str) -> None:
    from celery_redis_retry.targets import redacted

    url, problem = BAD_TARGET_URLS[kind]
    targets = {"default": "redis://127.0.0.1:1/0", "sessions": url}
    _worker_and_bridge_refuse({"redis_retry_targets": targets},
                              f"redis_retry_targets['sessions'] {problem}, got {redacted(url)!r}")


@pytest.mark.slow
def test_worker_and_bridge_refuse_an_unknown_key_at_startup() -> None:
    _worker_and_bridge_refuse({"redis_retry_max_retry": 5}, "redis_retry_max_retry is not a celery_redis_retry "
                                                            "setting: did you mean redis_retry_max_retries?")
