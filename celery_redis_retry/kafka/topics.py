"""``celery -A proj redis-retry topics create|describe``: the topics, made as production needs them.

Production clusters run with ``auto.create.topics.enable=false``: the retry topic
(``redis_retry_topic``), its dead-letter topic (``redis_retry_dlq_topic``), the topic
where workers report the ops they ended (``redis_retry_ends_topic``), the compacted
topic where operators pause targets (``redis_retry_control_topic``) and one
waiting topic per target (``<redis_retry_topic>.waiting.<target>``, where a target's
ops wait while it is down) are made by an admin step, before any producer, bridge or
worker starts. :func:`plan` says how, from the app's settings; :func:`create` makes what
is missing and leaves what exists alone (reporting where it differs from the plan);
:func:`describe` reads them back.

The defaults, and why:

* **partitions** 12 for the retry topic: the most bridges that can share the work
  (one partition feeds one bridge), and a number 1, 2, 3, 4 and 6 bridges divide
  evenly. The DLQ gets 3: dead letters are rare and read by an operator.
* **replication factor** 3, and ``min.insync.replicas`` 2: an acknowledged op
  (``acks=all``) is on two brokers, and the topic stays writable with one broker down.
  With fewer replicas, ``min.insync.replicas`` is one less than the replication factor
  (at least 1), so that one broker down does not stop every write.
* **retention** of the retry topic: an op must still be in Kafka when it ends, so the
  topic keeps records longer than the longest retry schedule
  (``redis_retry_max_retries`` x ``redis_retry_backoff_max``) and than
  ``redis_retry_max_age`` (an outage can keep an op waiting that long), plus a margin for
  a bridge stopped over a long weekend, and never less than 7 days. Waiting topics keep
  records as long, with as many partitions. The DLQ keeps records 28 days:
  the time an operator has to look at them. The ends topic keeps records 1 day with 3
  partitions: bridges read its records within moments of their writing, and only from
  where they stood when they started.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from celery_redis_retry import kafka
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import TopicSetupError
from celery_redis_retry.words import counted

DAY_MS = 24 * 3600 * 1000
DEFAULT_PARTITIONS = 12
DEFAULT_DLQ_PARTITIONS = 3
DEFAULT_REPLICATION_FACTOR = 3
#: The retry topic never keeps records for less than this.
MIN_RETENTION_MS = 7 * DAY_MS
#: Added to the retry window: the time ops may wait unread while no bridge runs.
RETENTION_MARGIN_MS = 3 * DAY_MS
DEFAULT_DLQ_RETENTION_MS = 28 * DAY_MS
DEFAULT_ENDS_PARTITIONS = 3
DEFAULT_ENDS_RETENTION_MS = DAY_MS
#: Control records are few and tiny: one partition keeps them in the order they were written.
DEFAULT_CONTROL_PARTITIONS = 1

#: The settings :func:`create` sets and :func:`differences` compares.
COMPARED = ("min.insync.replicas", "retention.ms", "cleanup.policy")


def min_insync_for(replication_factor: int) -> int:
    """``min.insync.replicas`` for a replication factor: 2 from 3 replicas on, else one less (at least 1)."""
    return 2 if replication_factor >= 3 else max(1, replication_factor - 1)


def retry_window_ms(settings: Settings) -> int:
    """The longest an op can spend in retries: ``max_retries`` x ``backoff_max`` (an upper bound)."""
    return int(settings.max_retries * settings.backoff.maximum * 1000)


def ops_retention_ms(settings: Settings) -> int:
    """``retention.ms`` of the retry and waiting topics: the longest an op may wait plus 3 days, at least 7."""
    longest = max(retry_window_ms(settings), settings.max_age * 1000)
    return max(MIN_RETENTION_MS, longest + RETENTION_MARGIN_MS)


@dataclass(frozen=True)
class TopicPlan:
    """One topic as :func:`create` would make it."""

    role: str  # "retry", "DLQ" or "waiting (<target>)"
    name: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """``partitions 12, replication factor 3, min.insync.replicas 2, retention 7 days``."""
        return _summary(self.partitions, self.replication_factor, self.config)


def plan(
    settings: Settings,
    *,
    partitions: int = DEFAULT_PARTITIONS,
    dlq_partitions: int = DEFAULT_DLQ_PARTITIONS,
    replication_factor: int = DEFAULT_REPLICATION_FACTOR,
    min_insync_replicas: int | None = None,
    retention_ms: int | None = None,
    dlq_retention_ms: int = DEFAULT_DLQ_RETENTION_MS,
) -> list[TopicPlan]:
    """The retry topic and the DLQ topic of ``settings``, with the defaults of this module.

    :class:`TopicSetupError` when ``min_insync_replicas`` exceeds the replication factor
    (no write could ever succeed).
    """
    insync = min_insync_for(replication_factor) if min_insync_replicas is None else min_insync_replicas
    if insync > replication_factor:
        raise TopicSetupError(
            f"min.insync.replicas {insync} is more than the replication factor {replication_factor}: "
            "no write could succeed; pass a smaller --min-insync-replicas"
        )
    common = {"min.insync.replicas": str(insync), "cleanup.policy": "delete"}
    retention = ops_retention_ms(settings) if retention_ms is None else retention_ms
    return [
        TopicPlan("retry", settings.topic, partitions, replication_factor,
                  {**common, "retention.ms": str(retention)}),
        TopicPlan("DLQ", settings.dlq_topic, dlq_partitions, replication_factor,
                  {**common, "retention.ms": str(dlq_retention_ms)}),
        *([TopicPlan("ends", settings.ends_topic, DEFAULT_ENDS_PARTITIONS, replication_factor,
                     {**common, "retention.ms": str(DEFAULT_ENDS_RETENTION_MS)})]
          if settings.commit_after == "end" else []),
        # Compacted: the last record per key (a target's pause) is kept for ever.
        TopicPlan("control", settings.control_topic, DEFAULT_CONTROL_PARTITIONS, replication_factor,
                  {"min.insync.replicas": str(insync), "cleanup.policy": "compact"}),
        # Where a target's ops wait while it is down: kept as long as the ops themselves.
        *(TopicPlan(f"waiting ({target})", topic, partitions, replication_factor,
                    {**common, "retention.ms": str(retention)})
          for target, topic in settings.waiting_topics.items()),
    ]


def plan_warnings(settings: Settings, plans: list[TopicPlan]) -> list[str]:
    """What in ``plans`` works against the settings: a retry topic kept longer than dedupe markers.

    An op read again after its marker expired (a consumer group reset to the earliest
    offset, say) would apply a non-idempotent command twice.
    """
    out = []
    for p in plans:
        retention = int(p.config.get("retention.ms", "-1"))
        if p.role not in ("DLQ", "ends", "control") and (retention < 0 or retention > settings.dedupe_ttl * 1000):
            shown = "forever" if retention < 0 else counted(retention / DAY_MS, "day")
            out.append(
                f"retry topic {p.name} keeps ops {shown}, longer than redis_retry_dedupe_ttl "
                f"({counted(settings.dedupe_ttl / 86400, 'day')}): raise redis_retry_dedupe_ttl to at least "
                f"{max(retention, 0) // 1000} s, or an op read again after its marker expired may apply twice"
            )
        if p.role not in ("DLQ", "ends", "control") and 0 <= retention < settings.max_age * 1000:
            out.append(
                f"{p.role} topic {p.name} keeps ops {counted(retention / DAY_MS, 'day')}, less than "
                f"redis_retry_max_age ({counted(settings.max_age / 86400, 'day')}): an op waiting out a long "
                "outage could be deleted unread"
            )
    return out


@dataclass(frozen=True)
class TopicState:
    """What :func:`create` or :func:`describe` found or did for one planned topic."""

    plan: TopicPlan
    #: "created", "exists", "missing" (describe), "would create" (dry run) or "failed".
    action: str
    found: kafka.TopicDescription | None = None
    error: str | None = None

    @property
    def differences(self) -> list[str]:
        """How an existing topic differs from the plan (empty when it matches or is missing)."""
        return [] if self.found is None else differences(self.plan, self.found)


def differences(planned: TopicPlan, found: kafka.TopicDescription) -> list[str]:
    """``partitions 4 (planned 12)``-style lines for each way ``found`` differs from ``planned``."""
    out = []
    if found.partitions != planned.partitions:
        out.append(f"partitions {found.partitions} (planned {planned.partitions})")
    if found.replication_factor != planned.replication_factor:
        out.append(f"replication factor {found.replication_factor} (planned {planned.replication_factor})")
    for key in COMPARED:
        want, have = planned.config.get(key), found.config.get(key)
        if want is not None and have != want:
            out.append(f"{key} {have if have is not None else 'unknown'} (planned {want})")
    return out


def describe(settings: Settings, plans: list[TopicPlan], *, timeout: float = 10.0) -> list[TopicState]:
    """Each planned topic as the cluster has it ("exists") or "missing". Creates nothing.

    :class:`~celery_redis_retry.kafka.KafkaException` when Kafka does not answer.
    """
    admin = kafka.new_admin(settings.kafka)
    found = kafka.describe_topics(admin, [p.name for p in plans], timeout=timeout)
    return [TopicState(p, "missing" if found[p.name] is None else "exists", found[p.name]) for p in plans]


def create(
    settings: Settings, plans: list[TopicPlan], *, dry_run: bool = False, timeout: float = 30.0
) -> list[TopicState]:
    """Create the planned topics that do not exist; report the others as they are.

    Idempotent: an existing topic is never changed, only described (see
    :attr:`TopicState.differences`). :class:`TopicSetupError` before anything is
    created when the cluster has fewer brokers than a missing topic's replication
    factor, or cannot create topics at all; ``dry_run`` checks the same, creates nothing.
    """
    admin = kafka.new_admin(settings.kafka)
    found = kafka.describe_topics(admin, [p.name for p in plans], timeout=timeout)
    missing = [p for p in plans if found[p.name] is None]
    if missing:
        brokers, has_controller = kafka.cluster_brokers(admin, timeout)
        bootstrap = settings.kafka.get("bootstrap.servers")
        widest = max(p.replication_factor for p in missing)
        if widest > brokers:
            raise TopicSetupError(
                f"replication factor {widest} needs at least {counted(widest, 'broker')}, but the cluster at "
                f"{bootstrap} has {brokers}; pass --replication-factor {brokers} (or add brokers)"
            )
        if not has_controller:
            raise TopicSetupError(
                f"the cluster at {bootstrap} has no controller and cannot create topics (the development broker, "
                "librdkafka's mock cluster, is such a cluster: it creates topics on first use, nothing to do there)"
            )
    created: dict[str, kafka.KafkaError | None] = {}
    if missing and not dry_run:
        created = kafka.create_topics(
            admin, [(p.name, p.partitions, p.replication_factor, p.config) for p in missing], timeout=timeout
        )
    states = []
    for p in plans:
        if found[p.name] is not None:
            states.append(TopicState(p, "exists", found[p.name]))
        elif dry_run:
            states.append(TopicState(p, "would create"))
        elif (error := created.get(p.name)) is None:
            states.append(TopicState(p, "created"))
        elif error.code() == kafka.KafkaError.TOPIC_ALREADY_EXISTS:
            # Someone else created it between our look and our request: report what is there.
            again = kafka.describe_topics(admin, [p.name], timeout=timeout)[p.name]
            states.append(TopicState(p, "exists", again))
        else:
            states.append(TopicState(p, "failed", error=error.str()))
    return states


def _summary(partitions: int, replication_factor: int, config: Mapping[str, str]) -> str:
    parts = [f"partitions {partitions}", f"replication factor {replication_factor}"]
    if "min.insync.replicas" in config:
        parts.append(f"min.insync.replicas {config['min.insync.replicas']}")
    retention = config.get("retention.ms")
    if retention is not None:
        parts.append(f"retention.ms {retention}{_days(retention)}")
    if config.get("cleanup.policy") == "compact":
        parts.append("compacted")
    return ", ".join(parts)


def _days(retention_ms: str) -> str:
    try:
        value = int(retention_ms)
    except ValueError:
        return ""
    if value < 0:
        return " (forever)"
    return f" ({counted(value / DAY_MS, 'day')})"


def found_summary(found: kafka.TopicDescription) -> str:
    """The summary line of an existing topic, as :meth:`TopicPlan.summary` words a plan."""
    return _summary(found.partitions, found.replication_factor, found.config)
