"""One open registry database: a DuckDB connection shared by the threads of the process that owns it.

How the database is shared (DuckDB allows one read-write process or many read-only ones, never both):
- Exactly one process per host owns `registry.duckdb`: the one holding the scheduler lock (the app's
  background scheduler, or `zimage worker`). It keeps the file open read-write for its whole life.
- Inside that process every thread gets a fresh `cursor()` per query (0.2 ms), since a DuckDB connection
  is not thread-safe; results are fetched fully before the cursor closes. All writes go through one
  lock (`write`), so two ingests never conflict on the same row; reads run beside them (MVCC).
- Other processes (the CLI) never open the database while an owner lives: they read the run folders,
  which are the truth, and send requests through files (control.json, the queue lock, the scheduler
  inbox for `registry rebuild`). So no DuckDB lock error can reach a user.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from zimage.registry.schema import RegistryError, migrate


class _SharedExclusive:
    """Many readers or one re-opener (rebuild swaps the file under the readers' feet otherwise)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def connect(path: Path | str) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) and migrate; a lock held by another program becomes a RegistryError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(path))
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise RegistryError(
                f"{path}: the registry is open in another program ({exc}); "
                "the zimage app or `zimage worker` owns it, use them (or stop them) instead"
            ) from None
        raise
    try:
        migrate(con, str(path))
    except BaseException:
        con.close()
        raise
    return con


class Registry:
    """The owner process's handle on registry.duckdb; pass it to the query functions."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._con: duckdb.DuckDBPyConnection | None = connect(self.path)
        self._gate = _SharedExclusive()
        self.write_lock = threading.RLock()  # one writer at a time within the process

    @property
    def closed(self) -> bool:
        return self._con is None

    @contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor for this thread, closed afterwards; fetch results inside the block."""
        with self._gate.shared():
            if self._con is None:
                raise RegistryError(f"{self.path}: the registry is closed")
            cur = self._con.cursor()
            try:
                yield cur
            finally:
                cur.close()

    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor inside one transaction, serialised with every other writer of this process."""
        with self.write_lock, self.read() as cur:
            cur.execute("BEGIN TRANSACTION")
            try:
                yield cur
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            cur.execute("COMMIT")

    def fetch(self, sql: str, params: list | None = None) -> list[tuple]:
        with self.read() as cur:
            return cur.execute(sql, params or []).fetchall()

    def fetch_df(self, sql: str, params: list | None = None):
        """The result as a pandas DataFrame."""
        with self.read() as cur:
            return cur.execute(sql, params or []).df()

    def replace_file(self, new_file: Path) -> None:
        """Swap in another database file (a rebuild) while no reader is inside; same object afterwards."""
        import os

        with self.write_lock, self._gate.exclusive():
            if self._con is not None:
                self._con.close()
                self._con = None
            os.replace(new_file, self.path)
            wal = Path(str(self.path) + ".wal")
            if wal.exists():
                wal.unlink()
            self._con = connect(self.path)

    def close(self) -> None:
        with self.write_lock, self._gate.exclusive():
            if self._con is not None:
                self._con.close()
                self._con = None
