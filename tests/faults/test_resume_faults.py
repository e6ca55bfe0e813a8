"""`--resume` keeps a run's config (each refused change named old -> new; the allowed ones recorded with their
epoch), one process holds a run or study directory and clears the temp files a killed one left, and the
command line turns each of these faults into one line with exit code 2."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from stacktrain.cli import main
from stacktrain.errors import ConfigError, RunBusyError
from stacktrain.train import checkpoint as ckpts
from stacktrain.train import loop
from stacktrain.train.config import load_config
from stacktrain.train.results import RESULTS_NAME, load_results
from stacktrain.train.resume import RESUMABLE
from stacktrain.train.split import load_split, split_hash, write_split
from stacktrain.train.study.runner import run_study
from tests.faults.conftest import ONE_EPOCH
from tests.support import FAKE, ROOT, VARIANTS, tiny_config, write_study

# -- config changes ------------------------------------------------------------------------------------
REFUSED = {  # override -> what the message shows
    "optim.lr=0.01": "optim.lr: 0.001 -> 0.01",
    "preprocess.normalize=percentile": "preprocess.normalize: 'scale' -> 'percentile'",
    "optim.weight_decay=0": "optim.weight_decay: 0.0001 -> 0.0",
    "optim.pos_weight=2.0": "optim.pos_weight: None -> 2.0",
    "train.seed=1": "train.seed: 0 -> 1",
    "loader.seed=1": "loader.seed: 0 -> 1",
    "loader.batch_size=2": "loader.batch_size: 4 -> 2",
    "loader.balance=true": "loader.balance: False -> True",
    "train.min_delta=0.1": "train.min_delta: 1e-05 -> 0.1",
    "train.select_level=patch": "train.select_level: 'stack' -> 'patch'",
    "train.aggregate=max": "train.aggregate: 'mean' -> 'max'",
    "patch.stride=[8, 16, 16]": "patch.stride: None -> [8, 16, 16]",
    "preprocess.jitter=2": "preprocess.jitter: 0 -> 2",
    "preprocess.flip=[false, false, false]": "preprocess.flip: [True, True, True] -> [False, False, False]",
    "model.options={stem_stride = 2}": "model.options: {} -> {'stem_stride': 2}",
    "train.channels_last=false": "train.channels_last: True -> False",
}


@pytest.mark.parametrize("override", REFUSED)
def test_resume_refuses_a_changed_config_naming_old_and_new(override, run_copy, data):
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()}
    with pytest.raises(ConfigError) as err:
        loop.train(tiny_config(*data, ONE_EPOCH, override), run_dir=run_copy, resume=True)
    message = str(err.value)
    assert REFUSED[override] in message and "\n" not in message and "new run directory" in message
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file()} == before


def test_every_refused_change_is_named_at_once(run_copy, data):
    with pytest.raises(ConfigError, match=r"optim.lr: 0.001 -> 0.01; train.seed: 0 -> 3"):
        loop.train(tiny_config(*data, ONE_EPOCH, "optim.lr=0.01", "train.seed=3"), run_dir=run_copy, resume=True)


def _moved_store(data, tmp_path):
    return f"data.store={shutil.copytree(data[0], tmp_path / 'moved.zarr')}"


def _moved_split(data, tmp_path):
    return f"data.split={shutil.copyfile(data[1], tmp_path / 'moved-split.json')}"


ALLOWED = {  # key -> its new value as an override (a function: built in the test's folder)
    "train.epochs": lambda data, tmp: "train.epochs=2",
    "train.patience": lambda data, tmp: "train.patience=5",
    "train.log_interval": lambda data, tmp: "train.log_interval=7",
    "train.memory_check": lambda data, tmp: "train.memory_check=false",
    "loader.workers": lambda data, tmp: "loader.workers=1",
    "loader.prefetch": lambda data, tmp: "loader.prefetch=3",
    "train.out_dir": lambda data, tmp: f"train.out_dir={tmp}",
    "train.run_name": lambda data, tmp: "train.run_name=renamed",
    "data.store": _moved_store,
    "data.split": _moved_split,
}


def test_every_allowed_key_has_a_case():
    assert sorted(ALLOWED) == sorted(RESUMABLE)


@pytest.mark.parametrize("key", ALLOWED)
def test_an_allowed_change_is_recorded_with_its_epoch(key, run_copy, data, tmp_path):
    override = ALLOWED[key](data, tmp_path)
    results = load_results(loop.train(tiny_config(*data, ONE_EPOCH, override), run_dir=run_copy, resume=True),
                           validate=True)
    (change,) = results["config_changes"]
    assert change["epoch"] == 1 and change["key"] == key and change["old"] != change["new"]
    assert results["stop_reason"] is not None and len(results["epochs"]) == (2 if key == "train.epochs" else 1)
    toml = (run_copy / loop.CONFIG_NAME).read_text()
    assert f"from epoch 1: {key} = " in toml.splitlines()[1]
    section, name = key.split(".")
    assert getattr(getattr(load_config(run_copy / loop.CONFIG_NAME), section), name) == change["new"]


def test_resume_refuses_other_train_val_stacks_behind_the_same_path(run_copy, data, tmp_path):
    split = load_split(data[1])
    fold = split["folds"][0]
    fold["train"], fold["val"] = fold["val"], fold["train"]
    split["sha256"] = split_hash(split["folds"])
    write_split(split, tmp_path / "swapped.json")
    with pytest.raises(ConfigError, match="train/val stacks differ"):
        loop.train(tiny_config(data[0], tmp_path / "swapped.json", ONE_EPOCH), run_dir=run_copy, resume=True)


# -- one holder per directory; a killed one's temp files ---------------------------------------------
LEFTOVERS = [".training_results.json.k1ll3d.tmp", ".last.pt.k1ll3d.tmp", ".best.pt.k1ll3d.tmp",
             ".config.toml.k1ll3d.tmp"]


def test_resume_removes_the_temp_files_of_a_killed_run(run_copy, data):
    for name in LEFTOVERS:
        (run_copy / name).write_bytes(b"cut short")
    loop.train(tiny_config(*data, ONE_EPOCH), run_dir=run_copy, resume=True)
    assert not list(run_copy.glob(".*.tmp")) and ckpts.saved_epoch(run_copy / ckpts.LAST) == 0


def test_a_study_rerun_removes_the_temp_files_of_a_killed_study(fake_data, tmp_path):
    study = write_study(tmp_path / "s.toml", *fake_data, VARIANTS, head="folds = [0]")
    out = run_study(study, tmp_path / "out", trainer=FAKE)
    run_dir = next((out / "runs").iterdir())
    stale = [out / ".study.json.k1ll3d.tmp", out / ".selection.json.k1ll3d.tmp", run_dir / ".study_run.json.x.tmp"]
    an_hour_ago = time.time() - 3600
    for path in stale:
        path.write_text("cut short")
        os.utime(path, (an_hour_ago, an_hour_ago))
    live = out / ".report.md.w0rk1ng.tmp"  # another machine may be writing it right now: kept
    live.write_text("being written")
    run_study(study, out, trainer=FAKE)
    assert not any(p.exists() for p in stale) and (out / "selection.json").exists()
    assert live.exists()


@contextlib.contextmanager
def held_by_another_process(folder, what: str):
    """`folder` held by a live Python process (hold_dir) for the block; yields that process."""
    code = ("import sys\nfrom stacktrain.io import hold_dir\n"
            "with hold_dir(sys.argv[1], sys.argv[2], str):\n    print('held', flush=True)\n    sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), what], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_a_second_process_cannot_train_into_a_held_run(run_copy, data):
    with held_by_another_process(run_copy, "run"):
        (run_copy / LEFTOVERS[0]).write_bytes(b"a live writer's")
        with pytest.raises(RunBusyError, match=r"another process is training into this run directory.*\.lock"):
            loop.train(tiny_config(*data, ONE_EPOCH), run_dir=run_copy, resume=True)
        assert (run_copy / LEFTOVERS[0]).exists()  # not the second process's to remove
    loop.train(tiny_config(*data, ONE_EPOCH), run_dir=run_copy, resume=True)
    assert not (run_copy / LEFTOVERS[0]).exists()


def test_a_killed_holder_leaves_no_stale_lock(run_copy, data):
    with held_by_another_process(run_copy, "run") as holder:
        holder.kill()
        holder.wait(timeout=60)
        loop.train(tiny_config(*data, ONE_EPOCH), run_dir=run_copy, resume=True)


def test_a_failed_start_leaves_no_run_directory(data, tmp_path):
    with pytest.raises(ConfigError):
        loop.train(tiny_config(*data, ONE_EPOCH, "data.val_part=test"), run_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists()


# -- the command line: one line, exit code 2 ----------------------------------------------------------
def one_line(capsys, argv) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_paths_that_must_be_folders(data, run_copy, tmp_path, capsys):
    config = run_copy / loop.CONFIG_NAME
    (tmp_path / "a-file").write_text("")
    assert "is a folder; give the config file itself" in one_line(capsys, ["train", tmp_path])
    assert "/dev/null" in one_line(capsys, ["train", config, "--set", "train.out_dir=/dev/null",
                                            "--set", "train.run_name=r"])
    assert "a-file" in one_line(capsys, ["train", config, "--run-dir", tmp_path / "a-file"])
    assert "is a file" in one_line(capsys, ["predict", run_copy / ckpts.BEST, data[0], "--out", tmp_path / "a-file"])
    study = write_study(tmp_path / "s.toml", data[0], data[1], VARIANTS, head="folds = [0]")
    for out in ("/dev/null", tmp_path / "a-file"):
        assert str(out) in one_line(capsys, ["study", study, "--out", out])


CLI = {  # a few cases in a real process: exit 2, one line on stderr, no traceback
    "config-ranges": (["train", "demo", "--set", "loader.prefetch=0", "--set", "optim.lr=nan"], "2 problems"),
    "empty-checkpoint": (["predict", "{tmp}/empty.pt", "{store}", "--out", "{tmp}/p"], "empty file (0 bytes)"),
    "resume-changed": (["train", "--resume", "{run}", "--set", "optim.lr=0.01"], "optim.lr: 0.001 -> 0.01"),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c == "resume-changed" else c
                                  for c in CLI])  # resume-changed: 20 s, refused in-process above as well
def test_the_command_line_prints_one_line_and_exits_2(case, data, run_copy, tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    argv, expected = CLI[case]
    argv = [a.format(tmp=tmp_path, store=data[0], run=run_copy) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "stacktrain", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "400"}, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err
    assert json.loads((run_copy / RESULTS_NAME).read_text())["stop_reason"] == "max_epochs"
