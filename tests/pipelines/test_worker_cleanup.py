"""A trainer killed with -9 leaves no DALI worker processes behind (they hold its pipes open)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import os, sys
from stacktrain.stores.reader import Store
from stacktrain.pipelines.config import LoaderConfig, PatchConfig, PreprocessConfig
from stacktrain.pipelines.loaders import build_loader
store = Store(sys.argv[1])
loader = build_loader(store, store.stack_ids, train=True, patch=PatchConfig(size=(8, 16, 16)),
                      prep=PreprocessConfig(), cfg=LoaderConfig(loader="dali-cpu", batch_size=2, workers=2,
                                                                 dtype="fp32"))
next(iter(loader.epoch(0)))
children = open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()
print(" ".join(children), flush=True)
sys.stdin.read()  # wait to be killed
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_dali_workers_exit_when_the_trainer_is_killed(small_store):
    path, _ = small_store
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            start_new_session=True)
    workers: list[int] = []
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert workers and all(_alive(w) for w in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30  # bounded wait for an observable condition
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(w) for w in workers), "DALI workers outlived the killed trainer"
    finally:
        proc.kill()
        for pid in workers:  # never leave strays behind, even when the assertion failed
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
