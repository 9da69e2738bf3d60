"""The publishing app of the chaos runs: a process that may be SIGKILLed at any moment.

    python tests/chaos/app.py --ledger FILE --seed N --start I --rate R [--count C]

configured like loop_app (CRR_* environment). It plays the workload from write ``I`` on,
``R`` writes per second, in small batches: each write goes in the ledger, then out (an op
published with the producer, or an ``app`` write sent through a wrapped client, which
captures it when its target does not answer); after each batch the producer is flushed
and a ``D`` line says the batch is durable. SIGTERM ends it after the batch in progress.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).parents[1]), str(Path(__file__).parents[1] / "apps")]

from chaos.ledger import LedgerWriter  # noqa: E402 - after the path above
from chaos.workload import Workload  # noqa: E402

#: Batches per second: each ends with a flush, so a batch is what a SIGKILL may leave uncertain.
BATCHES_PER_SECOND = 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--count", type=int, default=0, help="stop after write START+COUNT (0: until SIGTERM)")
    args = parser.parse_args(argv)

    stopping: list[bool] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

    from loop_app import app

    import celery_redis_retry
    from celery_redis_retry.targets import connect

    targets: dict[str, str] = {"default": os.environ["CRR_TARGET_URL"],
                               **json.loads(os.environ.get("CRR_EXTRA_TARGETS", "{}"))}
    workload = Workload(args.seed, tuple(targets))
    ledger = LedgerWriter(args.ledger)
    producer = celery_redis_retry.RetryProducer.from_app(app)
    capturing = [-1]  # the index of the app write in progress, for on_capture
    wrapped: dict[str, Any] = {
        name: celery_redis_retry.wrap(
            connect(url, socket_timeout=1.0, socket_connect_timeout=1.0), producer=producer, target=name,
            source="chaos.app",
            on_capture=lambda op: ledger.line("C", capturing[0], op.id),
        )
        for name, url in targets.items()
    }
    end = args.start + args.count if args.count else None
    per_batch = max(1, round(args.rate / BATCHES_PER_SECOND))
    started, index = time.monotonic(), args.start
    print(f"chaos app publishing from write {index} at {args.rate:g}/s", flush=True)
    while not stopping and (end is None or index < end):
        last = index + per_batch if end is None else min(index + per_batch, end)
        for i in range(index, last):
            write = workload.write(i)
            if write.published:
                op = write.build()
                ledger.line("I", i, op.id, f"{op.created_at:.6f}")
                producer.publish(op)
            else:
                ledger.line("I", i, "-", f"{time.time():.6f}")
                capturing[0] = i
                write.apply_direct(wrapped[write.target])
                ledger.line("A", i)
        while producer.flush(5.0):
            pass  # Kafka is slow to acknowledge: the batch is not durable until it does (or spools)
        ledger.line("D", last - 1, index)
        index = last
        ahead = (index - args.start) / args.rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
    producer.close(30)
    print(f"chaos app stopped before write {index}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
