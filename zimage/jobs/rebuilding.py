"""`zimage registry rebuild`: recreate registry.duckdb from the folders, whoever owns it now.

- This process runs the scheduler: rebuild into a new file and swap it in under the readers.
- Another process (the app, `zimage worker`) owns it: ask it through the inbox and wait for its answer,
  so the CLI never meets a DuckDB lock.
- Nobody owns it: take the owner lock for the duration (no scheduler can start meanwhile) and do it here.
The new database is built beside the old one and renamed over it, so a failed rebuild changes nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from zimage.registry.schema import RegistryError
from zimage.settings import Settings


def rebuild(settings: Settings, timeout: float = 600.0) -> dict:
    """Returns {"runs", "metrics", "samples", "datasets", "seconds", "by"}."""
    from zimage.jobs import owner as owner_mod
    from zimage.jobs import scheduler
    from zimage.registry.ingest import rebuild_into

    sched = scheduler.current(settings)
    if sched is not None:
        return {**sched.rebuild(), "by": "this process"}
    lock = owner_mod.OwnerLock(settings)
    if lock.try_acquire("rebuild"):
        try:
            tmp = settings.registry_dir / f".rebuild-{os.getpid()}.duckdb"
            counts = rebuild_into(tmp, settings)
            os.replace(tmp, settings.db_path)
            wal = Path(str(settings.db_path) + ".wal")
            if wal.exists():  # a WAL of the old file must not be replayed onto the new one
                wal.unlink()
            return {**counts, "by": "this process"}
        finally:
            lock.release()
    holder = lock.owner()
    req = owner_mod.post_request(settings, "rebuild")
    answer = owner_mod.wait_reply(settings, req, timeout)
    if answer is None:
        raise RegistryError(
            f"registry rebuild: {owner_mod.describe_owner(holder)} owns the registry and did not answer "
            f"within {timeout:g} s; the request stays queued in {owner_mod.inbox_dir(settings)}"
        )
    if not answer.get("ok"):
        raise RegistryError(f"registry rebuild failed in {owner_mod.describe_owner(holder)}: {answer.get('error')}")
    return {**answer["counts"], "by": owner_mod.describe_owner(holder)}
