"""Who may write into a store: one `convert` at a time, and none while a worker of an earlier, killed
one still writes; then what killed runs left behind is cleared."""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from stacktrain.errors import StoreError

from .convert_workers import WRITERS_LOCK
from .layout import LEGACY_STAGING, staging_dir

LOCK_NAME = "convert.lock"
OLD_WRITERS_WAIT_S = 600.0  # how long a convert waits for an earlier run's last worker to end its stack


def _wait_for_old_writers(store: Path, wait_s: float) -> None:
    """Return once no worker of an earlier convert holds the writers lock (see `exclusive`)."""
    path = staging_dir(store) / WRITERS_LOCK
    deadline = time.monotonic() + wait_s
    with open(path, "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return  # closing the file releases it: our own workers take it shared
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"{store}: a worker of an earlier `stacktrain convert` is still writing into this store "
                        f"(it holds {path}) after {wait_s:.0f} s; wait for it to end, or find it with "
                        f"`fuser {path}` and end it, then rerun") from None
                time.sleep(0.05)  # polling the lock itself, until the deadline


def _remove_leftovers(store: Path) -> None:
    """What killed runs left: anything in the staging folder but the locks, the temp files of atomic
    writes (`.NAME.*.tmp`, core/io.py) in the store root and the stack folders, and the staging folder
    older stores kept inside (`.staging/`)."""
    for leftover in staging_dir(store).iterdir():
        if leftover.name not in (LOCK_NAME, WRITERS_LOCK):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    shutil.rmtree(store / LEGACY_STAGING, ignore_errors=True)
    for tmp in [*store.glob(".*.tmp"), *store.glob("*/.*.tmp")]:
        if tmp.is_file():
            tmp.unlink()


def clear_staging(store: Path, wait_s: float = 10.0) -> None:
    """What an interrupted run's own workers left (they are ended, so the lock is free at once)."""
    _wait_for_old_writers(store, wait_s)
    _remove_leftovers(store)


@contextlib.contextmanager
def exclusive(store: Path) -> Iterator[None]:
    """One convert per store at a time, and no process of an earlier one still writing; then clear
    what killed earlier runs left.

    Why nothing of an earlier run writes after this: (1) holding convert.lock (exclusive) means the
    earlier run's main process has ended (a flock ends with its holder; spawned workers never inherit
    the descriptor). (2) A worker writes only inside a task, and holds writers.lock shared for the whole
    task, taken before the first write and followed by a check that its parent still lives
    (convert_workers.writing). Taking writers.lock exclusive succeeds only when no task holds it: every
    earlier task has then either ended, or not taken it yet, and one that takes it later finds its
    parent gone (it ended before (1)) and exits before writing. So neither the cleanup below nor this
    run races a writer of an earlier run."""
    staging = staging_dir(store)
    with open(staging / LOCK_NAME, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{store}: another `stacktrain convert` is writing this store; "
                             "wait for it to finish or choose another --out") from None
        _wait_for_old_writers(store, OLD_WRITERS_WAIT_S)
        _remove_leftovers(store)
        yield
