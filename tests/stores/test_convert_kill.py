"""SIGKILL a `stacktrain convert` subprocess mid-run, rerun it: the store equals a clean run's."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from stacktrain.stores.convert import ConvertOptions, convert
from stacktrain.stores.layout import staging_dir
from stacktrain.stores.reader import Store
from stacktrain.testing import tissue

REPO = Path(__file__).resolve().parents[2]
N_STACKS = 12
OPTIONS = ["--min-patch", "8", "32", "32", "--chunk", "8", "32", "32", "--shard", "16", "64", "64", "--no-progress"]


def _registered(out: Path) -> list[str]:
    try:  # the root zarr.json is replaced atomically: it is either absent or complete
        root = json.loads((out / "zarr.json").read_text())
    except FileNotFoundError:
        return []
    return [e["stack_id"] for e in root["attributes"]["stacktrain"]["stacks"]]


def _convert_cmd(manifest: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "stacktrain.cli", "convert", str(manifest), "--out", str(out), *OPTIONS]


def test_sigkill_then_rerun_equals_clean_run(tmp_path):
    base = tissue((3, 16, 96, 96), seed=0)
    rows = []
    for i in range(N_STACKS):  # distinct stacks, cheap to make: shifted copies of one volume
        np.save(tmp_path / f"s{i:02d}.npy", np.roll(base, 5 * i, axis=3))
        rows.append((f"s{i:02d}.npy", f"s{i:02d}", "MALADE" if i % 3 == 0 else "SAIN", f"p{i // 2}"))
    manifest = tmp_path / "labels.csv"
    with manifest.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "stack_id", "label", "group"), *rows])
    out = tmp_path / "killed.zarr"

    proc = subprocess.Popen(_convert_cmd(manifest, out), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not _registered(out):  # poll the observable condition: at least one stack registered
        assert proc.poll() is None, f"convert ended before it could be killed: {proc.stderr.read().decode()}"
        assert time.monotonic() < deadline, "no stack was registered within 120 s"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    at_kill = _registered(out)
    assert 1 <= len(at_kill) < N_STACKS, "the run must be killed mid-way"

    # What a killed run leaves is a valid store holding only complete stacks.
    store = Store(out)
    assert store.stack_ids == at_kill
    for sid in at_kill:
        assert store.read(sid).shape == (3, 16, 96, 96)
    complete = {p.parent.name: p.stat().st_ino for p in out.glob("s*/zarr.json")}

    rerun = subprocess.run(_convert_cmd(manifest, out), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = " ".join(rerun.stdout.split())
    assert f"{N_STACKS - len(complete)} converted, {len(complete)} skipped (unchanged), 0 failed" in summary
    for sid, inode in complete.items():  # skipped stacks were not rewritten
        assert (out / sid / "zarr.json").stat().st_ino == inode
    assert sorted(p.name for p in staging_dir(out).iterdir()) == ["convert.lock", "writers.lock"]

    clean = tmp_path / "clean.zarr"
    convert(manifest, clean, ConvertOptions(min_patch_zyx=(8, 32, 32), chunk_zyx=(8, 32, 32), shard_zyx=(16, 64, 64)))
    a, b = Store(out), Store(clean)
    assert a.stack_ids == b.stack_ids == [r[1] for r in rows]
    for sid in a.stack_ids:
        assert a.meta(sid) == b.meta(sid)
        np.testing.assert_array_equal(a.read(sid), b.read(sid))
        for name, values in a.stats(sid).items():
            np.testing.assert_array_equal(values, b.stats(sid)[name])
