"""How a command stops on Ctrl-C (SIGINT) and SIGTERM: the same way, as an exception in the main process.

`install()` (the CLI's `main`) makes both signals raise `Interrupted`, a KeyboardInterrupt that carries
the signal, so every `finally` and context manager on the way out runs (locks, claims, loaders, staging)
and the CLI exits with 128 + the signal (130, 143) after one "interrupted" line. A second signal while
that cleanup runs ends the process at once: whatever it left, the next run clears (convert's staging,
temp files of atomic writes, a stale claim).

Worker processes never decide to stop on their own: a terminal's Ctrl-C and a scheduler's SIGTERM
reach the whole process group, but only the main process may turn them into an orderly stop, and a
worker that raised KeyboardInterrupt would print its own traceback. So forked children that inherit
the handler (DALI's CPU workers) ignore SIGINT and give SIGTERM 5 s: their parent shuts them down its
own way as it unwinds (a DALI worker must not die while its parent closes the pool: the pool then
deadlocks on a queue lock the dead worker held), and a worker still there then ends itself.
torch's DataLoader workers get `loader_worker` (SIGINT ignored, SIGTERM ends them quietly).
Spawned workers call `ignore_in_worker()` (convert's: the parent SIGKILLs them) or
`stop_on_parent_term()` (a study's trainings, which must unwind: the parent relays SIGTERM).
`deferred()` holds a signal back until a group of writes that belong together (an epoch's results and
checkpoints) is done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOADER_EXIT_S = 5.0  # a loader worker's wait for its pool's own shutdown after a SIGTERM, then it exits
UNWIND_GRACE_S = 15.0  # a worker that unwinds its training (ends a step, releases its claim) before SIGKILL

_owner: int | None = None  # the pid that unwinds on a signal: forked children inherit the handler, not the pid
_worker: int | None = None  # a study worker's pid: SIGTERM from its parent ends it quietly while idle
_second_exits = True  # the CLI leaves at once on a second signal; a worker finishes its cleanup
_deferring = 0
_pending: int | None = None
_stopping = False

class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `exit_code` is what the command exits with (130, 143). Its args are
    the signal number alone, so it pickles (a study worker hands it back to its parent)."""

    def __init__(self, signum: int):
        super().__init__(int(signum))

    @property
    def signum(self) -> int:
        return self.args[0]

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return signal.Signals(self.signum).name


def exit_code(e: KeyboardInterrupt) -> int:
    """130 for Ctrl-C (a plain KeyboardInterrupt too), 143 for SIGTERM."""
    return e.exit_code if isinstance(e, Interrupted) else 128 + signal.SIGINT


def _handler(signum: int, frame) -> None:
    global _pending
    pid = os.getpid()
    if pid == _owner:
        if _stopping:  # a second signal while unwinding
            if _second_exits:
                os._exit(128 + signum)  # the user insists: leave now, without a traceback
            return  # a worker gets the group's signal and its parent's: one unwind is enough
        if _deferring:
            _pending = _pending or signum
            return
        _raise_now(signum)
    elif pid == _worker and signum == signal.SIGTERM:
        os._exit(0)  # an idle study worker: nothing to clean up
    elif signum == signal.SIGTERM:  # a forked loader worker (DALI's): its parent closes the pool as it unwinds
        _exit_later(LOADER_EXIT_S)


def _exit_later(delay_s: float) -> None:
    """End a worker whose parent's shutdown has not ended it after `delay_s` (its pool tears down without
    waiting for it, or its parent sent SIGTERM because it stays): never blocks, never exits twice."""
    timer = threading.Timer(delay_s, os._exit, (0,))
    timer.daemon = True
    timer.start()


def install() -> None:
    """In the main process: SIGINT and SIGTERM raise `Interrupted` (see the module docstring)."""
    global _owner, _stopping, _pending, _second_exits
    _owner, _stopping, _pending, _second_exits = os.getpid(), False, None, True
    for signum in STOP_SIGNALS:
        signal.signal(signum, _handler)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """`install()` for the block, then the handlers from before (a test calls the CLI's main in-process)."""
    before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    install()
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def ignore_in_worker() -> None:
    """A spawned worker that its parent ends with SIGKILL (convert's): both signals are ignored."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stop_on_parent_term() -> None:
    """A spawned worker that must unwind its task (a study's training: its claim, its run directory):
    the terminal's SIGINT is left to the parent; SIGTERM raises `Interrupted` inside `unwinding()` and
    ends an idle worker quietly."""
    global _worker, _second_exits
    _worker, _second_exits = os.getpid(), False
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _handler)


def loader_worker(_worker_id: int = 0) -> None:
    """torch DataLoader's worker_init_fn: SIGINT ignored, SIGTERM ends the worker with status 0, whoever sent
    it. torch's own SIGTERM handler does that only for its parent's and dies by the signal otherwise (a group
    kill); the parent then raises "DataLoader worker ... is killed by signal" over its own orderly stop.
    (A torch worker may end at any point: its parent's queues survive it, unlike DALI's.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


@contextlib.contextmanager
def unwinding() -> Iterator[None]:
    """Around a study worker's task: SIGTERM raises `Interrupted` here, so the task's cleanup runs."""
    global _owner, _stopping
    before, _owner, _stopping = _owner, os.getpid(), False
    try:
        yield
    finally:
        _owner = before


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back until the block ends, then raise it: writes that must land together
    (a results entry, then last.pt, then best.pt) are never cut between them."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending is not None:
            signum, _pending = _pending, None
            _raise_now(signum)


def _raise_now(signum: int) -> None:
    global _stopping
    _stopping = True
    raise Interrupted(signum)


def stop_processes(processes: Iterable, *, grace_s: float) -> None:
    """End multiprocessing processes: SIGTERM, up to `grace_s` seconds to unwind (0: SIGKILL at once),
    then SIGKILL; returns once all have ended."""
    processes = [p for p in processes if p.is_alive()]
    for p in processes:
        with contextlib.suppress(OSError, ValueError):
            p.kill() if grace_s <= 0 else p.terminate()
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            with contextlib.suppress(OSError, ValueError):
                p.kill()
            p.join()


def stop_pool(pool, *, grace_s: float) -> None:
    """Cancel a ProcessPoolExecutor's queued tasks and end its workers now (`stop_processes`). Python 3.11
    has no public way to stop running tasks (3.14 adds terminate_workers()); `_processes` is the pool's
    own list, taken before shutdown() drops it."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    stop_processes(processes, grace_s=grace_s)
