"""Who may write what in a store: many `convert` processes at once (one per part, on one machine or many
sharing the filesystem), each stack by one process at a time, the root index by one process at a time,
and maintenance (`relabel`, `remove`, `export`) alone; then what killed runs left behind is cleared.

All locks are flocks on files in the staging folder beside the store (`layout.staging_dir`):
- `convert.lock`: every convert holds it shared for its whole run, maintenance exclusive (`exclusive`);
- `writers.lock`: a pool worker holds it shared for each whole task (convert_workers.writing), so
  maintenance can wait until no worker of a killed convert is left;
- `locks/<stack_id>.lock` (`stack_lock`): held exclusive by the process that writes that stack (the
  worker itself, not its parent), from before its staging folder is made until it is renamed into place;
- `root.lock` (`root_lock`): held exclusive for each read-modify-write of the root `zarr.json`.
The per-stack and root lock files are unlinked by their holder on release (`_acquire` re-checks the inode
it locked), so a store at rest keeps only the first two.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from stacktrain.errors import StoreError

from . import convert_workers
from .convert_workers import WRITERS_LOCK
from .layout import LEGACY_STAGING, staging_dir

LOCK_NAME = "convert.lock"
LOCKS_DIR = "locks"
ROOT_LOCK = "root.lock"
KEPT = (LOCK_NAME, WRITERS_LOCK, LOCKS_DIR, ROOT_LOCK)  # staging entries that are not a stack's leftovers
OLD_WRITERS_WAIT_S = 600.0  # how long to wait for another process to end the stack it writes
POLL_S = 0.05  # between tries of a lock held by another process, until the deadline


def _acquire(path: Path, wait_s: float | None) -> int | None:
    """A descriptor holding an exclusive flock on `path` (created if missing), or None once `wait_s` has
    passed (0: one try; None: no limit). A holder unlinks the file before it lets go, so a lock taken on a
    file no longer at `path` (or on one since replaced) is dropped and taken again on the new file."""
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:  # a releasing holder removed the folder between mkdir's two checks: again
            if path.parent.exists() and not path.parent.is_dir():
                raise
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # its folder was removed between the two calls: make it again
            continue
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline is not None else 0))
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        return None
                    time.sleep(POLL_S)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _release(path: Path, fd: int) -> None:
    """Unlink while still holding (a process waiting on this file then retries on a new one), then let go."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)
    if path.parent.name == LOCKS_DIR:
        with contextlib.suppress(OSError):  # not empty: another stack is being written
            path.parent.rmdir()


@contextlib.contextmanager
def _held(path: Path, wait_s: float | None) -> Iterator[bool]:
    fd = _acquire(path, wait_s)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            _release(path, fd)


def _stack_lock_path(store: Path, stack_id: str) -> Path:
    return staging_dir(store) / LOCKS_DIR / f"{stack_id}.lock"


@contextlib.contextmanager
def root_lock(store: Path) -> Iterator[None]:
    """Hold the root index for one read-modify-write (short: no process holds it while writing a stack)."""
    with _held(staging_dir(store) / ROOT_LOCK, None):
        yield


def _owner(name: str) -> str:
    """The stack a staging entry belongs to: `STACK.RANDOM` (being written) or `STACK.old-RANDOM` (removed)."""
    return name.rsplit(".", 1)[0]


def _clear_stack(store: Path, stack_id: str) -> None:
    """Remove what earlier writers of this stack left: its staging folders and the temp files of atomic
    writes in its folder. Only with its lock held: then no live process writes any of them."""
    staging = staging_dir(store)
    for leftover in staging.iterdir():
        if leftover.name not in KEPT and _owner(leftover.name) == stack_id:
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    for tmp in (store / stack_id).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def stack_lock(store: Path, stack_id: str, wait_s: float | None = None) -> Iterator[None]:
    """Hold `stack_id` while this process writes it, its leftovers cleared first; StoreError when another
    process still writes it after `wait_s` (default OLD_WRITERS_WAIT_S). In a pool worker whose convert
    ended meanwhile, end the process before anything is written (see `converting` for why that matters)."""
    wait_s = OLD_WRITERS_WAIT_S if wait_s is None else wait_s
    path = _stack_lock_path(store, stack_id)
    with _held(path, wait_s) as got:
        if not got:
            raise StoreError(f"another process is still writing stack {stack_id!r} into {store} (it holds {path}) "
                             f"after {wait_s:.0f} s; wait for it to end, or find it with `fuser {path}` and end it, "
                             "then rerun") from None
        if convert_workers.parent_gone():
            os._exit(1)
        _clear_stack(store, stack_id)
        yield


def clear_leftovers(store: Path, ours: Iterable[str] = (), wait_s: float = 10.0) -> None:
    """Clear what killed runs left, for every stack that no live process writes (its lock is free), and
    release lock files that holders killed with -9 left; wait up to `wait_s` for the stacks `ours` (this
    run's own workers, being ended). Temp files beside the root zarr.json go under the root lock."""
    staging = staging_dir(store)
    owners = {_owner(p.name) for p in staging.iterdir() if p.name not in KEPT}
    owners |= {p.parent.name for p in store.glob("*/.*.tmp")}
    owners |= {p.name.removesuffix(".lock") for p in (staging / LOCKS_DIR).glob("*.lock")}
    deadline = time.monotonic() + wait_s
    ours = set(ours)
    for stack_id in sorted(owners):
        wait = max(0.0, deadline - time.monotonic()) if stack_id in ours else 0.0
        with _held(_stack_lock_path(store, stack_id), wait) as got:
            if got:
                _clear_stack(store, stack_id)
    with root_lock(store):
        shutil.rmtree(store / LEGACY_STAGING, ignore_errors=True)
        for tmp in store.glob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def converting(store: Path) -> Iterator[None]:
    """One convert's hold on a store that other converts may write at the same time (convert.lock shared:
    maintenance waits), then the leftovers of stacks no live process writes are cleared.

    Why no process of an earlier, killed run writes a stack while this one clears or writes it: a stack is
    written only by a process holding its lock, taken before its first write and released after the rename
    that puts it in place (or after its staging folder is removed); a pool worker that has taken it checks
    that its parent convert still lives and exits before writing if not (`stack_lock`). So while this
    process holds a stack's lock, every earlier writer of that stack has either ended (a flock ends with its
    holder, also on SIGKILL) or not taken the lock yet; one that takes it later belongs to a convert that
    is gone (it was killed before this run began, or it is a live convert and waits) and exits at that
    check. A live convert that wants the same stack waits for the lock, then finds the stack complete and
    skips it. Leftovers (staging folders `STACK.RANDOM` and `STACK.old-RANDOM`, temp files in a stack's
    folder, lock files a killed holder left) are removed only under their stack's lock, so nothing that
    another live convert is writing goes; the root's temp files only under the root lock."""
    with _store_lock(store, fcntl.LOCK_SH, "a `stacktrain relabel`, `remove` or `export` is changing this store; "
                     "wait for it to finish, then rerun"):
        clear_leftovers(store, wait_s=0.0)
        yield


@contextlib.contextmanager
def _store_lock(store: Path, mode: int, busy: str) -> Iterator[None]:
    """convert.lock held in `mode` (shared: a convert; exclusive: maintenance), or StoreError `busy` at once."""
    with open(staging_dir(store) / LOCK_NAME, "a") as lock:
        try:
            fcntl.flock(lock, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"{store}: {busy}") from None
        yield


def _wait_for_old_writers(store: Path, wait_s: float) -> None:
    """Return once no pool worker of a convert holds the writers lock (see `exclusive`)."""
    path = staging_dir(store) / WRITERS_LOCK
    deadline = time.monotonic() + wait_s
    with open(path, "a") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return  # closing the file releases it: workers take it shared
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"{store}: a worker of an earlier `stacktrain convert` is still writing into this store "
                        f"(it holds {path}) after {wait_s:.0f} s; wait for it to end, or find it with "
                        f"`fuser {path}` and end it, then rerun") from None
                time.sleep(POLL_S)


def _remove_leftovers(store: Path) -> None:
    """Everything in the staging folder but its two lasting locks, temp files of atomic writes (`.NAME.*.tmp`,
    core/io.py) in the store root and the stack folders, and the staging folder older stores kept inside."""
    for leftover in staging_dir(store).iterdir():
        if leftover.name not in (LOCK_NAME, WRITERS_LOCK):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    shutil.rmtree(store / LEGACY_STAGING, ignore_errors=True)
    for tmp in [*store.glob(".*.tmp"), *store.glob("*/.*.tmp")]:
        if tmp.is_file():
            tmp.unlink()


@contextlib.contextmanager
def exclusive(store: Path) -> Iterator[None]:
    """Maintenance: no convert running and no worker of a killed one still writing; then clear everything
    killed runs left. (1) Holding convert.lock exclusive means every convert's main process has ended (each
    holds it shared; spawned workers never inherit the descriptor). (2) A worker writes only inside a task
    and holds writers.lock shared for the whole task, taken before its first write and followed by a check
    that its parent still lives (convert_workers.writing). Taking writers.lock exclusive succeeds only when
    no task holds it: every task has then ended or not taken it yet, and one that takes it later finds its
    parent gone and exits before writing."""
    with _store_lock(store, fcntl.LOCK_EX, "another `stacktrain convert` is writing this store; wait for it to "
                     "finish or choose another --out"):
        _wait_for_old_writers(store, OLD_WRITERS_WAIT_S)
        _remove_leftovers(store)
        yield
