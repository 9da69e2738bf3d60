"""A publishing process for tests/test_producer_durability.py (settings: durability_app's environment).

Publishes ops with ``celery_redis_retry.publish`` and, once each ``publish`` has
returned, appends the op (wire format, one per line) to ``--out`` with a single
``write()``: a line in the file means the producer had taken the op, even if the
process is SIGKILLed the next instant. Then, depending on ``--then``:

``kill``     SIGKILL itself right after the last ``publish`` returned (the worst moment);
``settle``   wait until the producer has nothing pending and the spool is empty (or
             ``--settle-timeout`` passes), print the producer's counters as JSON, exit 0;
``forever``  keep publishing until a signal ends the process.

``--rate`` paces publishing (ops per second, by the clock: a pause is caught up);
without it, ops go as fast as the process can. ``--exit-on-sigterm`` installs an
application SIGTERM handler (``sys.exit(0)``) before the first publish, as web servers do.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

from durability_app import make_op  # the script's folder is on sys.path

import celery_redis_retry
from celery_redis_retry.message import encode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=0, help="ops to publish (0: no limit)")
    parser.add_argument("--rate", type=float, default=0.0, help="ops per second (0: as fast as possible)")
    parser.add_argument("--then", choices=("kill", "settle", "forever"), default="settle")
    parser.add_argument("--settle-timeout", type=float, default=60.0)
    parser.add_argument("--exit-on-sigterm", action="store_true")
    args = parser.parse_args(argv)

    if args.exit_on_sigterm:

        def leave(_signum: int, _frame: Any) -> None:
            sys.exit(0)

        signal.signal(signal.SIGTERM, leave)

    out = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    started = time.monotonic()
    n = 0
    while args.then == "forever" or n < args.count:
        if args.rate:
            due = started + n / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        op = make_op(n)
        celery_redis_retry.publish(op)
        os.write(out, encode(op) + b"\n")
        n += 1
    if args.then == "kill":
        os.kill(os.getpid(), signal.SIGKILL)

    producer = celery_redis_retry.default_producer()
    published_in = time.monotonic() - started
    deadline = time.monotonic() + args.settle_timeout
    while time.monotonic() < deadline and (producer.flush(0.5) or producer.spool.count()):
        time.sleep(0.1)
    report = {
        "published": n,
        "publish_seconds": round(published_in, 3),
        "settled_after_publishing_seconds": round(time.monotonic() - started - published_in, 3),
        "pending": producer.pending,
        "spool_left": producer.spool.count(),
        **vars(producer.stats),
    }
    print("REPORT " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
