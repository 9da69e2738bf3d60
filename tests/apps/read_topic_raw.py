"""Reader process for tests/test_publish_real.py: a whole topic through plain confluent-kafka.

Deliberately uses nothing from celery_redis_retry, so the package's own Kafka helpers
cannot hide a mistake they share with its producer. It takes every partition's high
watermark first (the publisher has exited, so the topic is final), reads each partition
from its beginning until it has passed that watermark and the consumer reported the
partition's end, and writes one JSON line per record:
``{"p": partition, "o": offset, "k": base64 key or null, "v": base64 value}``, then a
last line ``{"watermarks": {partition: [low, high]}}`` with the watermarks the fetches saw.

Both conditions, because brokers differ: Tansu 0.6.0 answers ListOffsets(latest) with
the base offset of the last record batch plus one, not the log end (30 records in three
batches of 10: high watermark 21), while its fetch responses carry the right one.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
import uuid

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    deadline = time.monotonic() + args.timeout
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": f"raw-reader-{uuid.uuid4().hex}",  # never joined: partitions are assigned
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }
    )
    try:
        metadata = consumer.list_topics(args.topic, timeout=10)
        described = metadata.topics.get(args.topic)
        if described is None or described.error is not None or not described.partitions:
            print(f"topic {args.topic!r} not found: {described and described.error}", file=sys.stderr)
            return 2
        watermarks = {
            p: consumer.get_watermark_offsets(TopicPartition(args.topic, p), timeout=10)
            for p in sorted(described.partitions)
        }
        # Partitions still to read, and the next offset each must reach at least.
        remaining = {p: high for p, (_, high) in watermarks.items()}
        at_end: set[int] = set()
        next_offset: dict[int, int] = {}
        consumer.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING) for p in watermarks])
        with open(args.out, "w") as out:
            while not (at_end >= set(remaining) and all(
                next_offset.get(p, 0) >= high for p, high in remaining.items()
            )):
                if time.monotonic() > deadline:
                    print(f"timed out; read up to {next_offset}, listed {remaining}, at end {at_end}", file=sys.stderr)
                    return 3
                for message in consumer.consume(1000, timeout=0.5):
                    error = message.error()
                    partition = message.partition()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            raise KafkaException(error)
                        at_end.add(partition)
                        continue
                    offset = message.offset()
                    at_end.discard(partition)
                    next_offset[partition] = offset + 1
                    out.write(json.dumps(
                        {"p": partition, "o": offset, "k": _b64(message.key()), "v": _b64(message.value())}
                    ) + "\n")
            seen = {p: consumer.get_watermark_offsets(TopicPartition(args.topic, p), cached=True) for p in remaining}
            out.write(json.dumps({"watermarks": {p: list(w) for p, w in seen.items()}}) + "\n")
    finally:
        consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
