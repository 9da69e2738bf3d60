"""The producer's spool (celery_redis_retry.capture.spool) on real SQLite files, across real processes.

No mocks: every test works on a file in ``tmp_path``; "another process" is either a
second :class:`Spool` on the same file (each instance is its own lease owner) or a
real child made with ``os.fork()`` or a subprocess, killed the hard way where the
test is about crashes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from celery_redis_retry.capture.spool import Spool
from celery_redis_retry.errors import PublishError, SpoolFullError


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "spool.sqlite3")


@pytest.fixture
def spools(path: str) -> Iterator[Callable[..., Spool]]:
    """``spools(**kwargs)``: a new Spool on the test's file; all are closed after the test."""
    made: list[Spool] = []

    def make(**kwargs: object) -> Spool:
        spool = Spool(path, **kwargs)  # type: ignore[arg-type]
        made.append(spool)
        return spool

    yield make
    for spool in made:
        spool.close()


def _values(spool: Spool, limit: int = 10**6) -> list[bytes]:
    messages = spool.claim(limit)
    spool.release()
    return [m.value for m in messages]


def _wait_child(pid: int, timeout: float = 20.0) -> int:
    """The child's exit status (negative: killed by that signal); kills it if it hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} hung for {timeout} s")


def _in_child(body: Callable[[], None]) -> int:
    """Fork, run ``body`` in the child, leave it with ``os._exit`` (0, or 1 on error); its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


# -- order -----------------------------------------------------------------------------------


def test_messages_come_back_oldest_first_across_puts_claims_and_removes(spools: Callable[..., Spool]) -> None:
    spool = spools()
    spool.put("t", b"k0", b"0")
    spool.put_many([("t", b"k%d" % n, b"%d" % n) for n in range(1, 500)], "batch")
    spool.put("other-topic", None, b"500")
    spool.put_many([("t", None, b"%d" % n) for n in range(501, 1000)])

    seen: list[bytes] = []
    while batch := spool.claim(128):
        assert [m.seq for m in batch] == sorted(m.seq for m in batch)
        seen += [m.value for m in batch]
        spool.remove([m.seq for m in batch])
    assert seen == [b"%d" % n for n in range(1000)]
    assert spool.count() == 0


def test_claimed_messages_carry_topic_key_value_exactly(spools: Callable[..., Spool]) -> None:
    spool = spools()
    before = time.time()
    spool.put("topic-a", b"\x00key\xff", b"\x00\x01value\xfe")
    spool.put("topic-b", None, b"")
    first, second = spool.claim(10)
    assert (first.topic, first.key, first.value) == ("topic-a", b"\x00key\xff", b"\x00\x01value\xfe")
    assert (second.topic, second.key, second.value) == ("topic-b", None, b"")
    assert before <= first.spooled_at <= second.spooled_at <= time.time()


# -- size bound ------------------------------------------------------------------------------


def test_a_full_spool_refuses_a_whole_batch_and_writes_none_of_it(spools: Callable[..., Spool]) -> None:
    spool = spools(max_bytes=10_000)
    spool.put_many([("t", b"key", b"v" * 997) for _ in range(9)])  # 9,000 bytes
    assert spool.status().bytes == 9000

    with pytest.raises(SpoolFullError, match=r"full \(9000 of 10000 bytes"):
        spool.put_many([("t", b"key", b"v" * 197) for _ in range(6)])  # 1,200 bytes: over by 200
    assert isinstance(SpoolFullError("x"), PublishError)  # callers catching PublishError see it too
    assert spool.count() == 9
    assert spool.status().bytes == 9000

    spool.put_many([("t", b"key", b"v" * 197) for _ in range(5)])  # exactly to the bound
    assert spool.status().bytes == 10_000
    with pytest.raises(SpoolFullError):
        spool.put("t", None, b"x")
    spool.remove([m.seq for m in spool.claim(1)])
    spool.put("t", None, b"x" * 1000)  # room again
    assert spool.status().bytes == 10_000


def test_the_bound_counts_what_every_process_added_and_drained(spools: Callable[..., Spool]) -> None:
    writer, drainer, other_writer = spools(max_bytes=65_536), spools(max_bytes=65_536), spools(max_bytes=65_536)
    for _ in range(60):
        writer.put("t", None, b"x" * 1000)
    # Another process drains everything: the writer can fill the spool again.
    drained = drainer.claim(1000)
    drainer.remove([m.seq for m in drained])
    assert len(drained) == 60
    for _ in range(60):
        writer.put("t", None, b"x" * 1000)
    # A third process sees the same 60,000 bytes: together they never pass the bound.
    for _ in range(5):
        other_writer.put("t", None, b"x" * 1000)
    with pytest.raises(SpoolFullError):
        other_writer.put("t", None, b"x" * 1000)
    assert writer.status().bytes <= 65_536
    assert Spool(writer.path).status().bytes == writer.status().bytes == 1000 * writer.count()


# -- the drain lease -------------------------------------------------------------------------


def test_one_drainer_at_a_time_until_its_lease_expires(spools: Callable[..., Spool]) -> None:
    first, second = spools(), spools()
    assert first.owner != second.owner
    first.put_many([("t", None, b"%d" % n) for n in range(10)])

    claimed = first.claim(4, lease=0.5)
    assert [m.value for m in claimed] == [b"0", b"1", b"2", b"3"]
    assert second.claim(4) == []  # the first one is draining
    assert second.status().lease_owner == first.owner
    assert [m.value for m in first.claim(4, lease=0.5)] == [b"0", b"1", b"2", b"3"]  # the holder renews

    time.sleep(0.6)  # the first one died without removing or releasing
    assert second.status().lease_owner is None
    taken_over = second.claim(4, lease=30)
    assert [m.value for m in taken_over] == [b"0", b"1", b"2", b"3"]  # nothing was lost with it
    assert first.claim(4) == []
    assert first.status().lease_owner == second.owner


def test_remove_deletes_only_what_was_delivered_and_release_hands_over(spools: Callable[..., Spool]) -> None:
    first, second = spools(), spools()
    first.put_many([("t", None, b"%d" % n) for n in range(6)])
    batch = first.claim(4)
    first.remove([batch[0].seq, batch[2].seq])  # 1 and 3 were not delivered
    first.remove([])
    assert second.claim(10) == []
    first.release()
    assert [m.value for m in second.claim(10)] == [b"1", b"3", b"4", b"5"]
    second.remove([m.seq for m in second.claim(10)])
    assert second.claim(10) == []  # empty: the drainer lets go of the lease by itself
    assert first.status().lease_owner is None
    first.release()  # not the holder: nothing happens
    assert first.count() == 0


def test_status_reports_what_waits_and_who_drains(spools: Callable[..., Spool], path: str) -> None:
    spool = spools(max_bytes=1 << 20)
    empty = spool.status()
    assert (empty.path, empty.messages, empty.bytes, empty.max_bytes) == (path, 0, 0, 1 << 20)
    assert empty.oldest_at is None
    assert empty.lease_owner is None

    before = time.time()
    spool.put("t", b"abc", b"12345")
    spool.put("t", None, b"678")
    status = spool.status()
    assert (status.messages, status.bytes) == (2, 11)
    assert status.oldest_at is not None
    assert before <= status.oldest_at <= time.time()
    spool.claim(1)
    assert spool.status().lease_owner == spool.owner


# -- fork() ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_forked_child_writes_with_its_own_connection_and_the_parent_reads_it(spools: Callable[..., Spool]) -> None:
    spool = spools()
    spool.put_many([("t", None, b"parent-%d" % n) for n in range(5)])
    assert spool.count() == 5  # the parent's connection is open across the fork

    pid = _in_child(lambda: spool.put_many([("t", None, b"child-%d" % n) for n in range(5)]))
    assert _wait_child(pid) == 0
    assert _values(spool) == [b"parent-%d" % n for n in range(5)] + [b"child-%d" % n for n in range(5)]


@pytest.mark.slow
def test_a_child_cannot_drain_while_its_parent_holds_the_lease(spools: Callable[..., Spool]) -> None:
    spool = spools()
    spool.put_many([("t", None, b"%d" % n) for n in range(4)])
    assert len(spool.claim(2)) == 2

    def child() -> None:
        if spool.claim(2):  # same Spool object, another process: another owner
            raise AssertionError("the child drained under its parent's lease")

    assert _wait_child(_in_child(child)) == 0


@pytest.mark.slow
def test_the_parent_closing_its_spool_loses_nothing_a_child_still_writes(
    spools: Callable[..., Spool], path: str
) -> None:
    spool = spools()
    spool.put("t", None, b"parent")
    ready_r, ready_w = os.pipe()

    def child() -> None:
        for n in range(200):
            spool.put("t", None, b"child-%d" % n)
            if n == 20:
                os.write(ready_w, b"x")
            time.sleep(0.002)

    pid = _in_child(child)
    os.read(ready_r, 1)
    spool.close()  # if this were the last real lock holder, SQLite would checkpoint and drop the WAL
    assert _wait_child(pid) == 0
    assert Spool(path).count() == 201


@pytest.mark.slow
def test_fork_while_another_thread_is_spooling_does_not_hang_the_child(spools: Callable[..., Spool]) -> None:
    spool = spools()
    stop = threading.Event()

    def keep_spooling() -> None:
        while not stop.is_set():
            spool.put("t", None, b"thread")

    writer = threading.Thread(target=keep_spooling)
    writer.start()
    try:
        for _ in range(10):
            assert _wait_child(_in_child(lambda: spool.put("t", None, b"child")), timeout=10) == 0
    finally:
        stop.set()
        writer.join()
    assert _values(spool).count(b"child") == 10


# -- crashes ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fsync", [False, True], ids=["default", "durable"])
def test_rows_committed_before_sigkill_are_there_after(path: str, fsync: bool) -> None:
    """A real subprocess spools, reports each commit on stdout, and SIGKILLs itself."""
    code = (
        "import os, signal, sys\n"
        "from celery_redis_retry.capture.spool import Spool\n"
        f"spool = Spool({path!r}, fsync={fsync})\n"
        "for n in range(300):\n"
        "    spool.put('t', None, b'%d' % n)\n"
        "    os.write(1, b'%d\\n' % n)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr
    committed = done.stdout.split()
    assert len(committed) == 300
    reopened = Spool(path)
    try:
        assert _values(reopened) == committed
        reopened.put("t", None, b"after")  # still writable: no lock left behind
        assert reopened.count() == 301
    finally:
        reopened.close()


@pytest.mark.slow
def test_a_batch_cut_by_sigkill_is_all_there_or_not_at_all(spools: Callable[..., Spool], path: str) -> None:
    spool = spools()
    spool.put("t", None, b"first")
    started_r, started_w = os.pipe()

    def child() -> None:
        os.write(started_w, b"x")
        for batch in range(10**6):
            spool.put_many([("t", None, b"%d-%d" % (batch, n)) for n in range(250)])

    pid = _in_child(child)
    os.read(started_r, 1)
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    assert _wait_child(pid) == -signal.SIGKILL
    reopened = Spool(path)
    try:
        values = _values(reopened)
    finally:
        reopened.close()
    assert values[0] == b"first"
    assert (len(values) - 1) % 250 == 0
    assert len(values) > 1
    assert values[1:] == [b"%d-%d" % (b, n) for b in range((len(values) - 1) // 250) for n in range(250)]


@pytest.mark.parametrize(("when", "nth"), [("c_return", 1), ("c_call", 3)], ids=["after-begin", "before-commit"])
def test_a_signal_that_interrupts_a_transaction_leaves_none_open(tmp_path: Path, when: str, nth: int) -> None:
    """A signal handler that raises (Ctrl-C, an app's ``sys.exit`` on SIGTERM) runs between two
    bytecodes: right after BEGIN returned, or right before COMMIT. The spool stays usable, for
    the close at exit that spools what librdkafka still held."""
    spool = Spool(str(tmp_path / "spool.sqlite3"))
    spool.put("t", None, b"kept")
    calls = 0

    def interrupt(_frame: Any, event: str, arg: Any) -> None:
        # Raised where the signal's handler would: as BEGIN (the 1st execute) returns, or as
        # COMMIT (the 3rd, after reading the spool's size) is called.
        nonlocal calls
        if event == when and getattr(arg, "__name__", "") == "execute":
            calls += 1
            if calls == nth:
                sys.setprofile(None)
                raise KeyboardInterrupt

    sys.setprofile(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            spool.put("t", None, b"interrupted")
    finally:
        sys.setprofile(None)
    spool.put("t", None, b"after")  # "cannot start a transaction within a transaction" if one was left open
    assert [m.value for m in spool.claim()] == [b"kept", b"after"]
    spool.close()
