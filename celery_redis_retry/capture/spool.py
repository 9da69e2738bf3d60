"""The producer's safety net: a local, crash-safe spool for ops Kafka could not take.

When Kafka is unreachable, librdkafka's queue is full, a delivery fails or the
producer hits a fatal error, the message goes here instead of being lost, and a
drainer republishes it, oldest first, once Kafka answers again.

Why SQLite in WAL mode (see ``docs/producer-durability.md``): it is in the standard
library, one file serves every process on the host (gunicorn workers, Celery prefork
children) with proper locking, and a committed row survives the process being killed.

* ``fsync=False`` (the default mode): ``synchronous=NORMAL``. A commit is one
  ``write()`` to the WAL; it survives SIGKILL of the process, not a power cut before
  the next checkpoint. About 20-50 us per op.
* ``fsync=True`` (durable mode): ``synchronous=FULL``. Every commit is fsynced
  before ``put`` returns; it survives a power cut. About a disk flush per op.

The size is bounded (``redis_retry_spool_max_bytes``); a full spool refuses new rows
with :class:`~celery_redis_retry.errors.SpoolFullError` instead of growing without end.
Only one process drains at a time (a lease row), so the spool's order is kept.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from celery_redis_retry.errors import SpoolFullError

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    topic      TEXT    NOT NULL,
    key        BLOB,
    value      BLOB    NOT NULL,
    spooled_at REAL    NOT NULL,
    reason     TEXT    NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS drain_lease (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    owner   TEXT    NOT NULL,
    until   REAL    NOT NULL
);
-- The bytes the spool holds, kept in the file by triggers so that every process
-- checks the bound against the same number, whoever added or drained the rows.
CREATE TABLE IF NOT EXISTS spool_size (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    bytes   INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS spool_size_insert AFTER INSERT ON spool BEGIN
    UPDATE spool_size SET bytes = bytes + length(NEW.value) + COALESCE(length(NEW.key), 0) WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS spool_size_delete AFTER DELETE ON spool BEGIN
    UPDATE spool_size SET bytes = bytes - length(OLD.value) - COALESCE(length(OLD.key), 0) WHERE id = 1;
END;
"""


@dataclass(frozen=True)
class SpooledMessage:
    """One message waiting in the spool."""

    seq: int
    topic: str
    key: bytes | None
    value: bytes
    spooled_at: float


@dataclass(frozen=True)
class SpoolStatus:
    """What ``celery redis-retry spool status`` shows."""

    path: str
    messages: int
    bytes: int
    max_bytes: int
    oldest_at: float | None
    lease_owner: str | None


class Spool:
    """A bounded, ordered, multi-process message spool in one SQLite file."""

    def __init__(self, path: str, *, max_bytes: int = 1 << 30, fsync: bool = False) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = 0
        _spools.add(self)

    @property
    def owner(self) -> str:
        """Who this instance is when it holds the drain lease: host, process and instance.

        Computed each time: a forked child must not drain under its parent's name.
        """
        return f"{os.uname().nodename}:{os.getpid()}:{id(self):x}"

    # -- connection ----------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        # A SQLite connection must not cross fork(): each process opens its own.
        if self._db is None or self._pid != os.getpid():
            folder = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(folder, mode=0o700, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
            db.executescript(_SCHEMA)
            if db.execute("SELECT 1 FROM spool_size").fetchone() is None:
                # First open (or a file from before the counter): count once. One
                # statement, so rows another process adds meanwhile are counted once.
                db.execute(
                    "INSERT OR IGNORE INTO spool_size (id, bytes) "
                    "SELECT 1, COALESCE(SUM(length(value) + COALESCE(length(key), 0)), 0) FROM spool"
                )
            self._db, self._pid = db, os.getpid()
        return self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except BaseException:
                # Also when a signal handler raised (KeyboardInterrupt, SystemExit) right
                # after BEGIN or COMMIT: a transaction left open would make every later one
                # (the close at exit that spools what is left) fail.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        """Close this process's connection (the file stays)."""
        with self._lock:
            self._disconnect()

    def _disconnect(self) -> None:
        if self._db is not None and self._pid == os.getpid():
            self._db.close()
        self._db = None

    # -- writing -------------------------------------------------------------------------

    def put(self, topic: str, key: bytes | None, value: bytes, reason: str = "") -> None:
        """Store one message (committed, and fsynced in durable mode, on return).

        Raises :class:`SpoolFullError` when it would exceed ``max_bytes``.
        """
        self.put_many([(topic, key, value)], reason)

    def put_many(self, messages: list[tuple[str, bytes | None, bytes]], reason: str = "") -> None:
        """Store several messages in one transaction, in order."""
        if not messages:
            return
        added = sum(len(v) + len(k or b"") for _, k, v in messages)
        now = time.time()
        with self._transaction() as db:
            size = int(db.execute("SELECT bytes FROM spool_size WHERE id = 1").fetchone()[0])
            if size + added > self.max_bytes:
                logger.error(
                    "spool %s is full (%d of %d bytes): %d messages refused", self.path, size, self.max_bytes,
                    len(messages),
                )
                raise SpoolFullError(
                    f"spool {self.path} is full ({size} of {self.max_bytes} bytes, redis_retry_spool_max_bytes)"
                )
            db.executemany(
                "INSERT INTO spool (topic, key, value, spooled_at, reason) VALUES (?, ?, ?, ?, ?)",
                [(t, k, v, now, reason) for t, k, v in messages],
            )

    # -- draining ------------------------------------------------------------------------

    def claim(self, limit: int = 500, lease: float = 60.0) -> list[SpooledMessage]:
        """The oldest ``limit`` messages, if this process holds (or takes) the drain lease.

        Returns ``[]`` when another live process is draining. Call :meth:`remove` for
        what was delivered; the lease expires by itself if this process dies.
        """
        now = time.time()
        with self._transaction() as db:
            holder = db.execute("SELECT owner, until FROM drain_lease WHERE id = 1").fetchone()
            if holder is not None and holder[0] != self.owner and holder[1] > now:
                return []
            rows = db.execute(
                "SELECT seq, topic, key, value, spooled_at FROM spool ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
            if rows:
                db.execute(
                    "INSERT INTO drain_lease (id, owner, until) VALUES (1, ?, ?) "
                    "ON CONFLICT(id) DO UPDATE SET owner = excluded.owner, until = excluded.until",
                    (self.owner, now + lease),
                )
            elif holder is not None and holder[0] == self.owner:
                db.execute("DELETE FROM drain_lease WHERE id = 1")
        return [SpooledMessage(r[0], r[1], r[2], r[3], r[4]) for r in rows]

    def remove(self, seqs: list[int]) -> None:
        """Delete delivered messages."""
        if not seqs:
            return
        with self._transaction() as db:
            db.executemany("DELETE FROM spool WHERE seq = ?", [(s,) for s in seqs])

    def release(self) -> None:
        """Give up the drain lease early (e.g. Kafka went away again)."""
        with self._transaction() as db:
            db.execute("DELETE FROM drain_lease WHERE id = 1 AND owner = ?", (self.owner,))

    # -- inspection ----------------------------------------------------------------------

    def count(self) -> int:
        """Messages waiting."""
        with self._lock:
            return int(self._conn().execute("SELECT COUNT(*) FROM spool").fetchone()[0])

    def status(self) -> SpoolStatus:
        """Counts, size, age of the oldest message and who drains."""
        with self._lock:
            db = self._conn()
            count, oldest = db.execute("SELECT COUNT(*), MIN(spooled_at) FROM spool").fetchone()
            size = db.execute("SELECT bytes FROM spool_size WHERE id = 1").fetchone()[0]
            lease = db.execute("SELECT owner, until FROM drain_lease WHERE id = 1").fetchone()
        owner = lease[0] if lease is not None and lease[1] > time.time() else None
        return SpoolStatus(self.path, int(count), int(size), self.max_bytes, oldest, owner)


# -- fork() ----------------------------------------------------------------------------------

_spools: weakref.WeakSet[Spool] = weakref.WeakSet()
_held_over_fork: list[Spool] = []


def _before_fork() -> None:
    # No SQLite connection may cross fork(), even one the child never uses: SQLite keeps
    # its file locks in per-process tables, the child inherits them, and the connection
    # it opens believes the parent's locks are its own and takes none. Another process
    # closing the file can then checkpoint and delete the WAL under the child, and the
    # child's commits vanish. So close every connection first, holding every spool's
    # lock so that no thread is inside SQLite; both sides reopen on next use.
    for spool in sorted(_spools, key=id):
        spool._lock.acquire()
        _held_over_fork.append(spool)
        spool._disconnect()


def _after_fork() -> None:
    while _held_over_fork:
        _held_over_fork.pop()._lock.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)
