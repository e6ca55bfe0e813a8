"""Ctrl-C (SIGINT) and SIGTERM stop every command within seconds, with one "interrupted" line and exit code
130 / 143, no traceback from any process, no process of the command left, and a state the rerun continues.

Each case is a real `stacktrain` subprocess in its own process group; the signal goes to the whole group,
as a terminal's Ctrl-C or a scheduler's SIGTERM does, so the workers get it too. The moment is chosen by
what the command writes (a stack in the store's staging folder, an epoch's log line after its files, a run's claim).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stacktrain import signals
from stacktrain.cli import main
from stacktrain.stores.convert import ConvertOptions, convert
from stacktrain.stores.layout import staging_dir
from stacktrain.stores.reader import Store
from stacktrain.testing import tissue
from stacktrain.train.checkpoint import LAST, load_checkpoint
from stacktrain.train.config import save_config
from stacktrain.train.loop import train
from stacktrain.train.results import RESULTS_NAME, load_results, strip_timing
from stacktrain.train.study.claims import CLAIM
from stacktrain.train.study.runs import peek_state
from tests.support import TINY, hpo_body, make_store, tiny_config, tiny_data, write_study

REPO = Path(__file__).resolve().parents[2]
STOP_DEADLINE_S = 30.0  # signal to the exit of the group's last process (measured 1-15 s on a loaded 2-core machine)
START_DEADLINE_S = 180.0  # for the command to reach the moment it is interrupted at (a loaded 2-core machine)
SIGNALS = [pytest.param(signal.SIGINT, id="sigint"), pytest.param(signal.SIGTERM, id="sigterm")]
LOCKS = ["convert.lock", "writers.lock"]


# -- the process group -------------------------------------------------------------------------------
def _group(pgid: int) -> list[int]:
    """Pids of the live processes of process group `pgid` (from /proc; zombies count as gone)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rpartition(")")[2].split()  # after "pid (comm)": state, ppid, pgrp
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(stat.parent.name))
    return pids


def _start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "stacktrain.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _interrupt(proc: subprocess.Popen, signum: int, before: str = "") -> str:
    """Send `signum` to the group; return stderr once the group is gone, asserting the exit, the deadline,
    one "interrupted" line and no traceback. `before`: stderr already read."""
    os.killpg(proc.pid, signum)
    t0 = time.monotonic()
    try:
        _, rest = proc.communicate(timeout=STOP_DEADLINE_S)
        while _group(proc.pid) and time.monotonic() - t0 < STOP_DEADLINE_S:  # workers exiting after main
            time.sleep(0.05)
        left = _group(proc.pid)
        print(f"stopped in {time.monotonic() - t0:.2f} s")  # the figure quoted in the README (pytest -s)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    stderr = before + rest
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert not left, f"processes of the command left after {STOP_DEADLINE_S} s: {left}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].endswith("interrupted"), stderr[-3000:]
    return stderr


def _poll(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the command ended before {what}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"not {what} within {START_DEADLINE_S} s"
        time.sleep(0.005)


def _read_until(proc: subprocess.Popen, prefix: str) -> str:
    """stderr up to the first line starting with `prefix` (blocks on the child's own output: no polling)."""
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(prefix):
            return "".join(seen)
    proc.wait()
    pytest.fail(f"the command ended before a line starting with {prefix!r}:\n" + "".join(seen)[-3000:])


# -- the mechanism, in this process ---------------------------------------------------------------------
@pytest.mark.parametrize("signum", SIGNALS)
def test_a_signal_inside_deferred_is_raised_once_the_block_is_done(signum):
    done = []
    with signals.installed(), pytest.raises(signals.Interrupted) as caught:
        with signals.deferred():
            signal.raise_signal(signum)  # its handler has run when this returns (CPython checks at once)
            done.append("written")
    assert done == ["written"] and caught.value.exit_code == 128 + signum
    with signals.installed(), pytest.raises(signals.Interrupted):  # outside deferred(): raised at once
        signal.raise_signal(signum)
        done.append("not reached")
    assert done == ["written"]
    assert pickle.loads(pickle.dumps(caught.value)).signum == signum  # a study worker hands it to its parent


# -- convert -----------------------------------------------------------------------------------------
CONVERT_OPTIONS = ConvertOptions(min_patch_zyx=(8, 32, 32), chunk_zyx=(8, 64, 64), shard_zyx=(16, 128, 128))
CONVERT_FLAGS = ["--min-patch", "8", "32", "32", "--chunk", "8", "64", "64", "--shard", "16", "128", "128",
                 "--no-progress"]


@pytest.fixture(scope="module")
def raw_stacks(tmp_path_factory) -> Path:
    """4 stacks of 3x96x256x256 (19 MB, 3 slabs each): a signal finds a worker inside a stack, with slabs to go."""
    root = tmp_path_factory.mktemp("raw")
    base = tissue((3, 96, 256, 256), seed=0)
    lines = ["path,stack_id,label,group"]
    for i in range(4):
        np.save(root / f"s{i}.npy", np.roll(base, 7 * i, axis=3))
        lines.append(f"s{i}.npy,s{i},{'MALADE' if i % 2 else 'SAIN'},p{i // 2}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


@pytest.fixture(scope="module")
def clean_store(raw_stacks, tmp_path_factory) -> Path:
    return convert(raw_stacks, tmp_path_factory.mktemp("clean") / "clean.zarr", CONVERT_OPTIONS).store


def _writing(out: Path) -> list[str]:
    """Stacks a worker has begun writing shards of, in the staging folder (STACK_ID.RANDOM folders)."""
    staging = staging_dir(out)
    if not staging.is_dir():
        return []
    return [d.name.rpartition(".")[0] for d in staging.iterdir() if d.name not in LOCKS
            and any(f.name != "zarr.json" and f.is_file() for f in d.rglob("*"))]


@pytest.mark.parametrize("signum", SIGNALS)
def test_convert_stops_cleans_staging_and_reruns_to_a_clean_store(raw_stacks, clean_store, tmp_path, capsys, signum):
    out = tmp_path / "store.zarr"
    proc = _start(["convert", str(raw_stacks), "--out", str(out), "--workers", "2", *CONVERT_FLAGS])
    _poll(lambda: _writing(out), proc, "a stack was being written")
    cut = _writing(out)
    _interrupt(proc, signum)
    # Staging is removed, not kept: stacks written whole are in the store, the ones being written are cut (not
    # finished first), the queued ones never started; the rerun converts both.
    assert sorted(p.name for p in staging_dir(out).iterdir()) == LOCKS
    kept = sorted(p.parent.name for p in out.glob("s*/zarr.json"))  # whole stacks (listed by then or by the rerun)
    assert set(Store(out).stack_ids) <= set(kept) and not set(cut) & set(kept), (cut, kept)
    assert main(["convert", str(raw_stacks), "--out", str(out), "--workers", "1", *CONVERT_FLAGS]) == 0  # the rerun
    assert f"{len(kept)} skipped (unchanged), 0 failed of 4" in " ".join(capsys.readouterr().out.split())
    a, b = Store(out), Store(clean_store)
    assert a.stack_ids == b.stack_ids == [f"s{i}" for i in range(4)]
    for sid in a.stack_ids:
        assert np.array_equal(a.read(sid), b.read(sid)), sid


# -- train -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("loader, signum, compare", [
    pytest.param("dali-cpu", signal.SIGTERM, True, id="dali-cpu-sigterm", marks=pytest.mark.slow),  # 25 s
    pytest.param("torch", signal.SIGINT, True, id="torch-sigint"),
    pytest.param("dali-cpu", signal.SIGINT, True, id="dali-cpu-sigint", marks=pytest.mark.slow),
    pytest.param("torch", signal.SIGTERM, True, id="torch-sigterm", marks=pytest.mark.slow),
])
def test_train_stops_in_its_second_epoch_and_resumes_to_the_uninterrupted_results(data, tmp_path, loader, signum,
                                                                                   compare):
    cfg = tiny_config(*data, "train.epochs=2", "train.log_interval=1", f"loader.loader={loader}", "loader.workers=1")
    config = tmp_path / "config.toml"
    save_config(cfg, config)
    run_dir = tmp_path / "run"
    proc = _start(["train", str(config), "--run-dir", str(run_dir)])
    seen = _read_until(proc, "epoch 0 (1/2) |")  # printed once epoch 0's results and last.pt are written
    _interrupt(proc, signum, seen)

    assert load_checkpoint(run_dir / LAST)["epoch"] == 0
    partial = json.loads((run_dir / RESULTS_NAME).read_text())  # valid JSON, the epoch before the signal
    assert [e["epoch"] for e in partial["epochs"]] == [0] and partial["stop_reason"] is None
    assert main(["train", "--resume", str(run_dir)]) == 0  # in this process: one torch start less
    resumed = load_results(run_dir / RESULTS_NAME)
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1] and resumed["stop_reason"] == "max_epochs"
    if compare:
        assert strip_timing(resumed) == strip_timing(load_results(train(cfg, run_dir=tmp_path / "clean")))


# -- study -------------------------------------------------------------------------------------------
STUDY_SETS = (*[s for s in TINY if not s.startswith(("train.epochs", "loader.workers", "patch.size"))],
              "train.epochs=2", "loader.workers=0", "patch.size=[8, 16, 16]")


def _interrupted_study(tmp_path: Path, body: str, workers: int, signum: int, head: str = "") -> tuple[list, Path]:
    """Start the study, interrupt it once a run has written an epoch; (its args, its runs folder)."""
    store, split = make_store(tmp_path, n=8, shape=(16, 32, 32), folds=2)
    study = write_study(tmp_path / "study.toml", store, split, body, sets=STUDY_SETS, head=head)
    out = tmp_path / "study"
    args = ["study", str(study), "--out", str(out), "--workers", str(workers)]
    proc = _start(args)
    _poll(lambda: any(out.glob("*/*/last.pt")) or any(out.glob("*/*/*/last.pt")), proc, "a run had an epoch")
    _interrupt(proc, signum)
    return args, out


@pytest.mark.parametrize("workers, signum", [
    pytest.param(1, signal.SIGTERM, id="1-worker-sigterm", marks=pytest.mark.slow),  # 20 s; the search cases stay
    pytest.param(2, signal.SIGINT, id="2-workers-sigint", marks=pytest.mark.slow),  # 3 torch starts: slow
    pytest.param(2, signal.SIGTERM, id="2-workers-sigterm", marks=pytest.mark.slow),
])
def test_study_stops_releases_its_claims_and_the_rerun_finishes_every_run(tmp_path, workers, signum):
    folds = list(range(workers))  # one run per worker
    args, out = _interrupted_study(tmp_path, "", workers, signum, head=f"folds = {folds}")
    runs = sorted((out / "runs").iterdir())
    assert not [d for d in runs if (d / CLAIM).exists()], "a claim was left behind"
    assert {peek_state(d) for d in runs} <= {"resume", "new"}  # interrupted in every run's epoch 1
    assert main(args[:-1] + ["1"]) == 0  # the rerun, in this process (no torch start per worker)
    assert [peek_state(d) for d in sorted((out / "runs").iterdir())] == ["done"] * len(folds)
    assert (out / "selection.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("workers, signum", [pytest.param(1, signal.SIGINT, id="1-worker-sigint"),
                                             pytest.param(2, signal.SIGTERM, id="2-workers-sigterm")])
def test_search_stops_and_the_rerun_resumes_the_interrupted_trial(tmp_path, workers, signum):
    args, out = _interrupted_study(tmp_path, hpo_body(trials=workers), workers, signum)
    started = sorted(p.name for p in (out / "trials").iterdir())
    assert main(args[:-1] + ["1"]) == 0
    after = sorted(p.name for p in (out / "trials").iterdir())
    assert set(started) <= set(after) and len(after) == workers  # the interrupted trials resumed, none added
    assert [peek_state(d) for d in sorted((out / "trials").glob("*/fold*"))] == ["done"] * 2 * workers
