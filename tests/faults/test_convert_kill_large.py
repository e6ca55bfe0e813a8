"""SIGKILL `stacktrain convert --workers 2` at chosen moments and rerun it at once: the store ends
byte for byte as a clean conversion writes it (every file but the lock folder).

The reported failure: 3 stacks of 3x192x768x768, the main pid killed while q0 was being written, an
immediate rerun; pool workers outlived their parent, kept writing under the rerun and renamed partial
stacks into place, which the rerun then trusted. Kill moments are chosen by polling the store's files.
With STACKTRAIN_TEST_ORPHANS=1 the workers outlive a killed parent (no PR_SET_PDEATHSIG, no check
between slabs), so those cases show that the writers lock alone keeps the rerun right.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from stacktrain.cli import build_parser
from stacktrain.stores.convert import ConvertOptions, convert
from stacktrain.stores.layout import staging_dir
from stacktrain.stores.reader import Store
from stacktrain.stores.verify import verify_store
from stacktrain.testing import tissue

REPO = Path(__file__).resolve().parents[2]
IDS = ("q0", "q1", "q2")


def _sources(folder: Path, shape_czyx, tile_zyx) -> Path:
    """Three distinct .npy stacks (a tissue block tiled, shifted per stack) and their manifest."""
    c, z, y, x = shape_czyx
    tz, ty, tx = tile_zyx
    base = np.tile(tissue((c, tz, ty, tx), seed=1), (1, z // tz, y // ty, x // tx))
    for i, sid in enumerate(IDS):
        np.save(folder / f"{sid}.npy", np.roll(base, 7 * i, axis=3))
    manifest = folder / "labels.csv"
    with manifest.open("w", newline="") as f:
        rows = [(f"{sid}.npy", sid, ("SAIN", "MALADE")[i % 2], f"p{i}") for i, sid in enumerate(IDS)]
        csv.writer(f).writerows([("path", "stack_id", "label", "group"), *rows])
    return manifest


def _cmd(manifest: Path, out: Path, options: list[str]) -> list[str]:
    return [sys.executable, "-m", "stacktrain.cli", "convert", str(manifest), "--out", str(out), "--workers", "2",
            "--no-progress", *options]


def _tree(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


# -- kill moments: conditions on the store's files ---------------------------------------------------
def _staged_shards(out: Path, sid: str) -> int:
    return sum(1 for d in staging_dir(out).glob(f"{sid}.*") for p in d.glob("image/0/c/0/*/*/*") if p.is_file())


def staging_appears(sid: str) -> Callable[[Path], bool]:
    return lambda out: any(staging_dir(out).glob(f"{sid}.*"))


def shards_staged(sid: str, n: int) -> Callable[[Path], bool]:
    return lambda out: _staged_shards(out, sid) >= n


def stats_staged(out: Path) -> bool:
    return any(staging_dir(out).glob("q*.*/stats"))


def stacks_in_place(n: int) -> Callable[[Path], bool]:
    return lambda out: sum((out / sid / "zarr.json").exists() for sid in IDS) >= n


def root_tmp(out: Path) -> bool:
    """The root list being rewritten after a stack is in place (the first root writes, the store's
    creation and its intensity record, come before any worker starts)."""
    return stacks_in_place(1)(out) and any(out.glob(".zarr.json.*.tmp"))


def _writers_busy(out: Path) -> bool:
    with open(staging_dir(out) / "writers.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def _kill_and_rerun(tmp_path: Path, manifest: Path, options: list[str], when: Callable[[Path], bool], group: bool,
                    orphans: bool, deadline_s: float, rerun_here: bool = False) -> Path:
    """Start convert, SIGKILL it (the main pid or its whole group) once `when(out)` holds, rerun it at
    once (`rerun_here`: in this process, which starts in milliseconds, well before an orphan is done)."""
    out = tmp_path / "killed.zarr"
    env = {**os.environ, "STACKTRAIN_TEST_ORPHANS": "1" if orphans else "0"}
    proc = subprocess.Popen(_cmd(manifest, out, options), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + deadline_s
        while not staging_dir(out).is_dir() or not when(out):
            assert proc.poll() is None, f"convert ended before the kill moment: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "the kill moment never came"
            time.sleep(0.002)  # polling the files (the condition), not waiting for time to pass
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if orphans:  # the scenario of the report: a worker of the killed run is still writing
            assert _writers_busy(out)
        if rerun_here:
            args = build_parser().parse_args(_cmd(manifest, out, options)[3:])
            values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ConvertOptions)}
            opts = ConvertOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
            assert "0 failed of 3 stacks" in convert(manifest, out, opts).summary()
        else:
            rerun = subprocess.run(_cmd(manifest, out, options), cwd=REPO, env=env, capture_output=True, text=True,
                                   timeout=deadline_s * 3)
            assert rerun.returncode == 0, rerun.stderr
            assert "0 failed of 3 stacks" in rerun.stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # orphans idle on their task queue: they write nothing
        proc.stderr.close()
    return out


def _assert_same_as_clean(out: Path, clean: Path) -> None:
    got, want = _tree(out), _tree(clean)
    assert sorted(got) == sorted(want)
    for name, data in want.items():
        assert got[name] == data, name
    assert all(c.ok for c in verify_store(out, deep=True))
    assert Store(out).stack_ids == list(IDS)


# -- the reported case, at full size (slow) ----------------------------------------------------------
LARGE = (3, 192, 768, 768)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    folder = tmp_path_factory.mktemp("large")
    manifest = _sources(folder, LARGE, (32, 128, 128))
    clean = folder / "clean.zarr"
    subprocess.run(_cmd(manifest, clean, []), cwd=REPO, check=True, capture_output=True, timeout=900)
    return manifest, clean


KILLS = [  # (id, moment, kill the whole group, workers outlive the parent)
    ("main-at-q0-staging", staging_appears("q0"), False, False),
    ("group-at-q0-staging", staging_appears("q0"), True, False),
    ("main-at-q0-first-shard-orphans", shards_staged("q0", 1), False, True),
    ("main-at-q1-9-shards-orphans", shards_staged("q1", 9), False, True),
    ("main-at-q0-27-shards", shards_staged("q0", 27), False, False),
    ("group-at-q1-27-shards", shards_staged("q1", 27), True, False),
    ("main-at-stats-orphans", stats_staged, False, True),
    ("group-at-first-stack-in-place", stacks_in_place(1), True, False),
    ("main-at-root-list-tmp-orphans", root_tmp, False, True),
    ("main-at-q2-staging", staging_appears("q2"), False, False),
    ("main-at-q2-staging-orphans", staging_appears("q2"), False, True),
    ("group-at-q2-9-shards", shards_staged("q2", 9), True, False),
]


@pytest.mark.slow
@pytest.mark.parametrize(("when", "group", "orphans"), [k[1:] for k in KILLS], ids=[k[0] for k in KILLS])
def test_kill_then_rerun_equals_a_clean_conversion(large, tmp_path, when, group, orphans):
    manifest, clean = large
    out = _kill_and_rerun(tmp_path, manifest, [], when, group, orphans, deadline_s=600)
    _assert_same_as_clean(out, clean)


# -- the same on small stacks (part of `make test`) --------------------------------------------------
SMALL_OPTIONS = ["--chunk", "8", "32", "32", "--shard", "16", "64", "64", "--min-patch", "8", "32", "32"]


def test_kill_main_pid_with_orphan_workers_then_rerun_equals_clean(tmp_path):
    manifest = _sources(tmp_path, (3, 64, 256, 256), (16, 64, 64))
    clean = tmp_path / "clean.zarr"
    subprocess.run(_cmd(manifest, clean, SMALL_OPTIONS), cwd=REPO, check=True, capture_output=True, timeout=300)
    out = _kill_and_rerun(tmp_path, manifest, SMALL_OPTIONS, shards_staged("q1", 9), group=False, orphans=True,
                          deadline_s=120, rerun_here=True)
    _assert_same_as_clean(out, clean)
