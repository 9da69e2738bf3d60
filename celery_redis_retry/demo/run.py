"""``python -m celery_redis_retry.demo`` (``make demo``): the whole flow, an outage and its recovery.

Starts every process of a deployment on this machine (the embedded Kafka, a target
Redis, a Celery broker Redis, a ``celery worker`` and a ``celery redis-retry bridge``),
plays the story of :mod:`celery_redis_retry.demo.story` in this process while the
target Redis is killed and restarted, waits for the backlog to drain, then checks every
write against Redis and both Kafka topics (:mod:`celery_redis_retry.demo.verify`).
Exits 0 only when the accounting balances; every process it started is stopped, also
on Ctrl-C and on errors.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_redis_retry import kafka
from celery_redis_retry.demo.console import Console, bar, table
from celery_redis_retry.demo.story import HOT_KEYS, Ledger, WebApp
from celery_redis_retry.demo.verify import Accounting, Tracker, account, read_dead_letters
from celery_redis_retry.testing import CeleryCommand, CeleryWorker, EmbeddedKafka, HarnessError, RedisServer, free_port

APP = "celery_redis_retry.demo.app"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m celery_redis_retry.demo",
        description="A web app writes to Redis; Redis is killed and restarted; every failed write is captured in "
        "Kafka, replayed by a Celery worker, or dead-lettered. Ends with an accounting checked against Redis "
        "and Kafka. Exit status 0 only when it balances.",
    )
    parser.add_argument("--rate", type=float, default=100.0, help="writes per second (default 100)")
    parser.add_argument("--duration", type=float, default=13.0, help="seconds the app writes (default 13)")
    parser.add_argument("--ops", type=int, default=None, help="number of writes (default: rate x duration)")
    parser.add_argument("--outage-seconds", type=float, default=6.0, help="how long Redis stays down (default 6)")
    parser.add_argument("--drain-timeout", type=float, default=120.0, help="give up draining after seconds")
    parser.add_argument("--concurrency", type=int, default=2, help="Celery worker processes (default 2)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the work directory and its logs")
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.outage_seconds <= 0 or (args.ops is not None and args.ops < 1):
        parser.error("--rate, --outage-seconds and --ops must be positive")
    args.ops = args.ops or max(1, int(args.rate * args.duration))
    args.duration = args.ops / args.rate
    if args.duration < args.outage_seconds + 2:
        parser.error(f"the app writes for {args.duration:g} s: make it at least --outage-seconds + 2 s")
    args.outage_at = (args.duration - args.outage_seconds) / 2
    return args


class Deployment:
    """The demo's processes, each stopped by the ExitStack that started it (last started, first stopped)."""

    def __init__(self, workdir: Path, console: Console, stack: contextlib.ExitStack, args: argparse.Namespace):
        self.workdir, self.console, self.stack, self.args = workdir, console, stack, args

    def start(self) -> None:
        say, t = self.console.say, time.monotonic()
        say("starting the processes")
        self.kafka = self.stack.enter_context(EmbeddedKafka(log_dir=self.workdir).start())
        say(f"  embedded Kafka   celery-redis-retry dev-kafka            {self.kafka.bootstrap_servers}")
        # appendfsync always: a write Redis acknowledged survives the SIGKILL, so every
        # write the app saw succeed must still be there at the end.
        durable = ["--appendonly", "yes", "--appendfsync", "always"]
        self.target = self.stack.enter_context(
            RedisServer(free_port(), args=durable, dir=str(self.workdir / "target-redis")).start()
        )
        say(f"  target Redis     redis-server (AOF, appendfsync always)  {self.target.url}")
        self.broker = self.stack.enter_context(RedisServer(dir=str(self.workdir / "broker-redis")).start())
        say(f"  Celery broker    redis-server                            {self.broker.url}")
        env = {
            "CRR_DEMO_BROKER_URL": self.broker.url,
            "CRR_DEMO_BOOTSTRAP": self.kafka.bootstrap_servers,
            "CRR_DEMO_TARGET_URL": self.target.url,
            "CRR_DEMO_SPOOL": str(self.workdir / "spool.sqlite3"),
        }
        os.environ.update(env)  # this process publishes with the workers' settings (demo/app.py)
        self.worker = CeleryWorker(APP, queues=["redis-retry"], concurrency=self.args.concurrency, env=env,
                                   log_dir=self.workdir)
        self.bridge = CeleryCommand(APP, ["redis-retry", "bridge"], env=env, log_dir=self.workdir)
        self.stack.enter_context(self.bridge.start())  # both boot at once; the worker is awaited first
        self.stack.enter_context(self.worker.start(timeout=120))
        say(f"  Celery worker    celery -A {APP} worker -Q redis-retry -c {self.args.concurrency}")
        self.bridge.wait_for_log(r"bridge consuming", timeout=120)
        say(f"  bridge           celery -A {APP} redis-retry bridge")
        say(f"  (all up in {time.monotonic() - t:.1f} s; the default retry settings: 3 retries, 1-2-4 s, "
            "and an outage spends none of them)")

    def publish_foreign_message(self, topic: str) -> None:
        """A message from a newer client (wire format v2) that the bridge must reject, not choke on."""
        producer = kafka.new_producer({"bootstrap.servers": self.kafka.bootstrap_servers})
        future = {"v": 2, "id": "from-a-newer-client", "kind": "command", "created_at": time.time(), "cmds": []}
        producer.produce(topic, orjson.dumps(future), b"default\x00newer-client")
        if producer.flush(10):
            raise HarnessError(f"could not publish to {topic}")


def play(
    app: WebApp, deployment: Deployment, console: Console, args: argparse.Namespace, tracker: Tracker
) -> float:
    """Serve ``args.ops`` requests at ``args.rate``; kill and restart Redis on schedule; return when Redis is back."""
    target = deployment.target
    checker = target.client()
    next_poll = 0.0
    backlog = ""
    ledger = app.ledger
    counts = {"direct": 0, "captured": 0, "refused": 0, "failed": 0}
    console.event(f"the app writes {args.rate:g}/s through celery_redis_retry.wrap(redis.Redis(...)) "
                  "and the on_failure guard")
    restarted_at: list[float] = []
    restarter: threading.Thread | None = None
    state = "up"
    start = time.monotonic()
    for index in range(args.ops):
        now = time.monotonic() - start
        if state == "up" and now >= args.outage_at:
            target.kill()
            state = "down"
            console.event(f"target Redis KILLED (SIGKILL); writes fail and are captured for {args.outage_seconds:g} s")
        elif state == "down" and now >= args.outage_at + args.outage_seconds:
            # Restarting takes a moment (the AOF is loaded): the app goes on meanwhile.
            def restart() -> None:
                target.start()
                restarted_at.append(time.monotonic())

            restarter = threading.Thread(target=restart, name="restart-redis")
            restarter.start()
            state = "restarting"
        elif state == "restarting" and restarted_at:
            state = "up again"
            console.event(f"target Redis restarted on the same port; replays drain the backlog ({counts['captured']}"
                          f" captured so far); the app writes its {HOT_KEYS} hot prices again at once")
            _write_hot(app, index, range(HOT_KEYS), counts, tracker)  # newer than every captured price
        delay = start + index / args.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        write = app.request(index)
        counts[write.path] += 1
        tracker.add(write)
        if state == "down":  # a price changes on every request; each write is captured
            _write_hot(app, index, [index % HOT_KEYS], counts, tracker)
        if state == "up again" and time.monotonic() >= next_poll:  # the backlog drains while the app writes
            next_poll = time.monotonic() + 0.5
            backlog = f"   replayed {bar(tracker.poll(checker), tracker.total, width=20)}"
        console.status(f"writes {index + 1:>6}/{args.ops}   at once {counts['direct']:>6}   captured "
                       f"{counts['captured']:>5}   Redis: {state:<10}{backlog}")
    checker.close()
    if restarter is not None:
        restarter.join()
    elif not restarted_at:  # fewer writes than the schedule needed: finish the outage anyway
        target.start()
        restarted_at.append(time.monotonic())
    console.event(f"the app stopped after {len(ledger.writes)} writes: {counts['direct']} applied at once, "
                  f"{counts['captured']} captured, {counts['refused']} refused at once by Redis (not captured)")
    return restarted_at[0]


def _write_hot(app: WebApp, index: int, slots: Iterable[int], counts: dict[str, int], tracker: Tracker) -> None:
    for slot in slots:
        hot = app.hot_write(index, slot)
        counts[hot.path] += 1
        tracker.add(hot)


def drain(tracker: Tracker, deployment: Deployment, console: Console, timeout: float) -> float | None:
    """Show the backlog draining (read from Redis); return when the last replayable op was seen applied."""
    deadline = time.monotonic() + timeout
    with deployment.target.client() as client:
        while True:
            done = tracker.poll(client)
            console.status(f"replayed {bar(done, tracker.total)}  (applied, as read from Redis)",
                           force=not tracker.pending)
            if not tracker.pending:
                return tracker.empty_at
            if time.monotonic() > deadline:
                console.event(f"gave up draining after {timeout:g} s: {len(tracker.pending)} ops not applied")
                return None
            time.sleep(0.25)


def run(args: argparse.Namespace, console: Console, workdir: Path, stack: contextlib.ExitStack) -> Accounting:
    deployment = Deployment(workdir, console, stack, args)
    deployment.start()
    from celery_redis_retry.config import settings_for

    os.environ["CRR_DEMO_WEB_APP"] = "1"  # this process is the web app (see demo/app.py)
    from celery_redis_retry.demo import app as demo_app

    settings = settings_for(demo_app.app)
    deployment.publish_foreign_message(settings.topic)
    deployment.bridge.wait_for_log(r"assigned " + re.escape(settings.topic), timeout=60)
    console.say()
    # redis-py 8 retries a failed connection 3 times (~3 s) by default: the request would
    # hang and the failure surface late. Fail at once, the op is captured in microseconds.
    client = deployment.target.client(socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    ledger = Ledger()
    app = WebApp(client, ledger, dict(settings.scripts))
    app.prepare(args.ops)
    console.t0 = time.monotonic()
    tracker = Tracker()
    restarted_at = play(app, deployment, console, args, tracker)
    applied_at = drain(tracker, deployment, console, args.drain_timeout)
    if applied_at is not None:
        console.event(f"every replayable op is applied ({applied_at - restarted_at:.1f} s after Redis came back); "
                      "reading the DLQ")
    expected_letters = 1 + sum(1 for w in ledger.captured if w.dlq is not None)
    letters, letters_at = read_dead_letters(
        deployment.kafka.bootstrap_servers, settings.dlq_topic, expected_letters, timeout=60
    )
    with deployment.target.client() as check:
        acc = account(check, ledger, bootstrap=deployment.kafka.bootstrap_servers, topic=settings.topic,
                      letters=letters, foreign_messages=1)
    if applied_at is not None and letters_at is not None:
        acc.drain_seconds = max(applied_at, letters_at) - restarted_at
    retries = len(re.findall(r"retrying in", deployment.worker.log_text()))
    opened = len(re.findall(r"cannot take writes .*: circuit open", deployment.bridge.log_text()))
    console.event(f"checked {acc.attempted} writes against Redis, {settings.topic} and {settings.dlq_topic} "
                  f"(the target's circuit opened {opened} time(s): its ops waited out the outage in "
                  f"{settings.waiting_topic('default')}; the workers retried {retries} times)")
    console.say()
    console.say(table(acc, topic=settings.topic, dlq_topic=settings.dlq_topic))
    return acc


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C, and SIGTERM (a CI timeout, `kill`), unwind through the finally blocks that stop
    # every process the demo started; a shell may have started us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="crr-demo-"))
    logging.basicConfig(
        filename=workdir / "demo-app.log", level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    console.say("celery_redis_retry demo: a web app keeps writing to Redis, Redis dies, nothing is lost")
    console.say(f"  {args.ops} writes at {args.rate:g}/s; the target Redis is killed at {args.outage_at:.1f} s "
                f"and restarted {args.outage_seconds:g} s later")
    console.say(f"  logs: {workdir}")
    console.say()
    started = time.monotonic()
    code, acc = 1, None
    try:
        with contextlib.ExitStack() as stack:
            try:
                acc = run(args, console, workdir, stack)
            finally:
                console.say()
                console.say("stopping every process the demo started...")
                stopping = time.monotonic()
                from celery_redis_retry.capture.producer import close_all

                close_all(5.0)
        console.say(f"  all stopped in {time.monotonic() - stopping:.1f} s")
        code = 0 if acc is not None and acc.balanced else 1
    except KeyboardInterrupt as exc:
        console.say(f"interrupted ({exc or 'SIGINT'}): every process the demo started was stopped")
        code = 130
    except HarnessError as exc:
        console.say(f"a process could not start or stopped: {exc}")
    _verdict(console, acc, code)
    keep = args.keep_logs or code != 0
    console.say(f"done in {time.monotonic() - started:.1f} s; logs {'kept in' if keep else 'removed from'} {workdir}"
                + ("" if keep else " (--keep-logs keeps them)"))
    logging.shutdown()
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return code


def _verdict(console: Console, acc: Any, code: int) -> None:
    if acc is None:
        return
    if code == 0:
        console.say("the accounting balances: every failed write was captured, then applied exactly once or "
                    "dead-lettered with a reason; nothing lost, nothing applied twice, no newer write overwritten")
        return
    console.say("the accounting does NOT balance:")
    for problem in acc.problems:
        console.say(f"  - {problem}")


if __name__ == "__main__":
    sys.exit(main())
