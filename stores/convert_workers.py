"""The worker processes of `stacktrain convert`: one stack per task, progress through a queue, and
workers that never write without their parent (a SIGKILLed convert leaves no orphan writing into the store).

Three layers: the kernel kills a worker whose parent dies (PR_SET_PDEATHSIG, Linux); a worker that sees
its parent gone between slabs ends itself; and a worker holds the store's writers lock (shared flock on
`writers.lock` in the store's staging folder) for each whole task, taken before the task's first write
and checked against its parent's life, so maintenance can wait until no earlier writer is left
(stores/convert_lock.py `exclusive` says why that is enough); for each stack it also holds that stack's
lock (convert_lock.stack_lock, which ends a worker whose parent is gone: `parent_gone`; `converting` says
why that is enough for other converts). Between tasks a worker holds no lock and writes nothing: an idle
orphan blocked on its task queue cannot hold a rerun up. STACKTRAIN_TEST_ORPHANS=1 turns the first two
layers off, so that tests/faults can show the locks alone keep a store right.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import fcntl
import functools
import multiprocessing
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from stacktrain import signals

from .layout import staging_dir

WRITERS_LOCK = "writers.lock"
_PROGRESS_QUEUE = None
_PARENT: int | None = None
_WRITERS_LOCK_PATH: str | None = None
_ORPHANS = os.environ.get("STACKTRAIN_TEST_ORPHANS") == "1"  # tests only: workers outlive a killed parent


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive its `convert` (killed with SIGKILL, it cannot stop them): where the
    kernel offers it (Linux prctl PR_SET_PDEATHSIG), the worker gets SIGKILL when its parent dies, so
    no orphan writes into a store that a rerun is already converting."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


def _init_worker(queue, parent: int, writers_lock: str) -> None:
    global _PROGRESS_QUEUE, _PARENT, _WRITERS_LOCK_PATH
    signals.ignore_in_worker()  # Ctrl-C reaches the whole group; the parent ends workers (`run_stacks`)
    if not _ORPHANS:
        _die_with_parent(parent)
    _PROGRESS_QUEUE, _PARENT, _WRITERS_LOCK_PATH = queue, parent, writers_lock


@contextlib.contextmanager
def writing() -> Iterator[None]:
    """Hold the writers lock (shared) for one task; end the process if the parent is gone by then.
    Taking it blocks while a new convert, which holds it exclusive, clears the staging folder."""
    with open(_WRITERS_LOCK_PATH, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        if os.getppid() != _PARENT:  # our convert ended: a newer one may own the store now
            os._exit(1)
        yield


def parent_gone() -> bool:
    """In a pool worker: whether the convert that started it has ended (False in a convert's own process)."""
    return _PARENT is not None and os.getppid() != _PARENT


def _queue_progress(index: int, fraction: float) -> None:
    if os.getppid() != _PARENT and not _ORPHANS:  # between slabs: the parent is gone (no PR_SET_PDEATHSIG)
        os._exit(1)
    _PROGRESS_QUEUE.put((index, fraction))


def _convert_in_worker(convert_stack, index: int, row, store: Path, opts):
    with writing():
        return convert_stack(row, store, opts, functools.partial(_queue_progress, index))


def run_stacks(convert_stack, rows, store, opts, progress) -> Iterator[tuple[int, object]]:
    """(manifest index, `convert_stack` outcome) as stacks finish; in this process or in `opts.workers`
    processes (spawned, at most one per stack)."""
    if opts.workers == 1 or len(rows) == 1:
        for i, row in enumerate(rows):
            yield i, convert_stack(row, store, opts, functools.partial(progress.fraction, i))
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs rich's refresh thread
    queue = ctx.Queue()
    pool = cf.ProcessPoolExecutor(min(opts.workers, len(rows)), mp_context=ctx,
                                  initializer=_init_worker,
                                  initargs=(queue, os.getpid(), str(staging_dir(store) / WRITERS_LOCK)))
    try:
        futures = {pool.submit(_convert_in_worker, convert_stack, i, row, store, opts): i for i, row in enumerate(rows)}
        pending = set(futures)
        while pending:
            done, pending = cf.wait(pending, timeout=0.25, return_when=cf.FIRST_COMPLETED)
            while not queue.empty():
                progress.fraction(*queue.get())
            for future in done:
                yield futures[future], future.result()
    except (KeyboardInterrupt, GeneratorExit):  # interrupted, or closed early by `convert`: queued stacks
        # never start, running ones are cut now (convert then clears their staging)
        signals.stop_pool(pool, grace_s=0)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
