"""Who owns each stored object (file, batch, assistant, thread, vector store, stored response, ...) created
through azproxy: an embedded SQLite file in the state directory, or Redis when several hosts must agree.

The stores are blocking and thread-safe; the caller runs them in a thread (`asyncio.to_thread`), so a slow disk
or a busy SQLite lock never stalls the event loop. Each holds one connection (SQLite) or pool (Redis), closed
when the store is collected or the process exits, so no shutdown step needs to know about them. Rows are one per
object a client created and are removed when it is deleted through azproxy.
"""

from __future__ import annotations

import sqlite3
import threading
import weakref
from collections.abc import Collection
from pathlib import Path
from typing import Any, Final, Protocol

#: The file in the state directory holding the ownership records.
SQLITE_FILE: Final = "owners.sqlite3"
#: Seconds a write waits for another process's write to finish (several workers share the file).
BUSY_TIMEOUT: Final = 5.0
#: Redis keys are this prefix and the object's id; the value is the owning client's name.
REDIS_PREFIX: Final = "azproxy:owner:"
#: SQLite's default limit on `?` parameters in one statement is 999 on older builds.
_BATCH: Final = 500


class OwnerStore(Protocol):
    def owners(self, ids: Collection[str]) -> dict[str, str]:
        """The owner of each id that has one; ids unknown to the store are left out."""
        ...

    def claim(self, ids: Collection[str], owner: str) -> None:
        """Record `owner` for each id that has none yet (an owner is never replaced)."""
        ...

    def forget(self, object_id: str) -> None: ...


class SqliteOwners:
    """One file shared by every process on this host: WAL lets readers proceed while one writes, and the busy
    timeout makes concurrent writers wait instead of failing. `synchronous=NORMAL` skips the fsync per write:
    a power cut may lose the last records, which makes those objects unreachable, never visible to others."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / SQLITE_FILE
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def owners(self, ids: Collection[str]) -> dict[str, str]:
        unique = list(dict.fromkeys(ids))
        found: dict[str, str] = {}
        with self._lock:
            db = self._open()
            for start in range(0, len(unique), _BATCH):
                part = unique[start : start + _BATCH]
                marks = ",".join("?" * len(part))
                rows = db.execute(f"SELECT id, owner FROM owners WHERE id IN ({marks})", part)
                found.update(rows.fetchall())
        return found

    def claim(self, ids: Collection[str], owner: str) -> None:
        with self._lock:
            db = self._open()
            with db:
                db.executemany(
                    "INSERT OR IGNORE INTO owners (id, owner) VALUES (?, ?)", [(i, owner) for i in ids]
                )

    def forget(self, object_id: str) -> None:
        with self._lock:
            db = self._open()
            with db:
                db.execute("DELETE FROM owners WHERE id = ?", (object_id,))

    def _open(self) -> sqlite3.Connection:
        """The connection, made on first need: a proxy that never stores an object creates no file."""
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                with db:
                    db.execute(
                        "CREATE TABLE IF NOT EXISTS owners (id TEXT PRIMARY KEY, owner TEXT NOT NULL) "
                        "WITHOUT ROWID"
                    )
            except BaseException:
                db.close()
                raise
            weakref.finalize(self, db.close)
            self._db = db
        return self._db


class RedisOwners:
    """Records shared by every azproxy using the same Redis: `azproxy:owner:{id}` → client name, no expiry."""

    def __init__(self, url: str) -> None:
        import redis

        self._redis: Any = redis.Redis.from_url(url)
        weakref.finalize(self, self._redis.close)

    def owners(self, ids: Collection[str]) -> dict[str, str]:
        unique = list(dict.fromkeys(ids))
        values = self._redis.mget([REDIS_PREFIX + i for i in unique]) if unique else []
        return {i: v.decode() for i, v in zip(unique, values, strict=True) if v is not None}

    def claim(self, ids: Collection[str], owner: str) -> None:
        with self._redis.pipeline(transaction=False) as pipe:
            for object_id in ids:
                pipe.set(REDIS_PREFIX + object_id, owner, nx=True)
            pipe.execute()

    def forget(self, object_id: str) -> None:
        self._redis.delete(REDIS_PREFIX + object_id)
