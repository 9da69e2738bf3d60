"""DLQ records read back the op they keep exactly, whatever its values."""

from __future__ import annotations

import msgspec
import pytest

from celery_redis_retry import message, ops
from celery_redis_retry.dlq.record import DeadLetter, decode_record
from celery_redis_retry.errors import DecodeError


def test_a_dead_letter_keeps_integers_over_64_bits_exactly() -> None:
    op = msgspec.structs.replace(ops.incrby("n", 2**70), attempt=2**64)
    letter = DeadLetter(outcome="dead", reason="invalid_value", op=op)
    read = decode_record(message.dumps(letter.document())).op
    assert read is not None
    assert (read.commands, read.attempt) == (op.commands, 2**64)
    assert type(read.commands[0][2]) is int


@pytest.mark.parametrize("value", [b"", b"{", b"[]", b'{"outcome": "dead"}'])
def test_what_is_no_dlq_record_is_refused_naming_it(value: bytes) -> None:
    with pytest.raises(DecodeError, match="DLQ record"):
        decode_record(value)
