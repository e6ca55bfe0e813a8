"""A grid study shared by several processes through one study directory (claims.py): each run is
trained once, the results equal one process's, a dead holder's run is taken over and resumed."""

from __future__ import annotations

import collections
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from rich.console import Console

from stacktrain.cli import main
from stacktrain.train.results import RESULTS_NAME, load_results, strip_timing
from stacktrain.train.study.claims import CLAIM, Claim, holder, is_stale
from stacktrain.train.study.runner import run_study
from tests.support import FAKE, ROOT, VARIANTS, log_lines, run_killed, write_study

MODELS = "\n[models.resnet3d18]\n[models.resnet3d50]\n"


def grid(tmp_path, fake_data, beat=30.0):
    store, split = fake_data
    return write_study(tmp_path / "grid.toml", store, split, VARIANTS + MODELS, sets=("train.epochs=3",),
                       head=f"heartbeat_s = {beat}")


def comparable(out):
    """Every run's results without timing fields, by run folder."""
    runs = {}
    for path in sorted(out.glob(f"runs/*/{RESULTS_NAME}")):
        results = load_results(path)
        runs[path.parent.name] = ([strip_timing(e) for e in results["epochs"]], results["best_epoch"],
                                  results["stop_reason"])
    return runs


def test_two_processes_train_each_run_once_and_match_one_process(tmp_path, fake_data):
    study, out, log = grid(tmp_path, fake_data), tmp_path / "shared", tmp_path / "calls.jsonl"
    code = ("from stacktrain.train.study.runner import run_study; "
            f"run_study({str(study)!r}, {str(out)!r}, trainer={FAKE!r})")
    env = {**os.environ, "FAKE_LOG": str(log)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trained = collections.Counter(c["run"] for c in log_lines(log))
    assert len(trained) == 3 * 2 * 2 and set(trained.values()) == {1}, trained  # 2 variants x 2 models x 3 folds
    assert not list(out.glob(f"runs/*/{CLAIM}*"))  # every claim released

    alone = run_study(study, tmp_path / "alone", trainer=FAKE)
    assert comparable(out) == comparable(alone)


def test_a_run_whose_holder_was_killed_is_taken_over_and_resumed(tmp_path, fake_data, monkeypatch):
    study, out, log = grid(tmp_path, fake_data), tmp_path / "out", tmp_path / "calls.jsonl"
    victim = "runs/percentile--resnet3d18--fold1"
    run_killed(study, out, FAKE, {"FAKE_LOG": str(log), "FAKE_KILL": f"{victim[5:]}:1"}, tmp_path)
    left = holder(out / victim)
    assert left is not None and left["host"] == socket.gethostname()  # the dead process's claim is still there
    log.unlink()
    monkeypatch.setenv("FAKE_LOG", str(log))
    run_study(study, out, trainer=FAKE)  # same host, pid gone: taken over at once, no heartbeat wait
    calls = log_lines(log)
    assert {"run": victim, "resume": True} in calls
    assert collections.Counter(c["run"] for c in calls)[victim] == 1
    assert load_results(out / victim / RESULTS_NAME)["stop_reason"] is not None
    assert comparable(out) == comparable(run_study(study, tmp_path / "clean", trainer=FAKE))


def _foreign_claim(run_dir, age_s):
    run_dir.mkdir(parents=True)
    path = run_dir / CLAIM
    path.write_text(json.dumps({"host": "another-machine", "pid": 4242, "token": "abc", "since": 0}))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_another_machines_silent_claim_is_taken_over_after_its_heartbeat_timeout(tmp_path, fake_data, monkeypatch):
    beat = 2.0  # the first run is reached well within 3 beats: found live, waited for, then taken over
    study, out, log = grid(tmp_path, fake_data, beat), tmp_path / "out", tmp_path / "calls.jsonl"
    held = out / "runs/scale--resnet3d18--fold0"
    _foreign_claim(held, age_s=0.0)  # nobody touches it from now on
    monkeypatch.setenv("FAKE_LOG", str(log))
    started = time.time()
    run_study(study, out, trainer=FAKE, console=Console(file=io.StringIO()))
    runs = [c["run"] for c in log_lines(log)]
    assert runs[-1] == "runs/scale--resnet3d18--fold0" and len(runs) == 12  # trained last, once, after the wait
    assert time.time() - started >= 3 * beat  # not before its claim went stale
    assert not (held / CLAIM).exists()


def test_a_live_claim_is_respected_and_listed(tmp_path, fake_data, capsys):
    study, out = grid(tmp_path, fake_data), tmp_path / "out"
    path = _foreign_claim(out / "runs/scale--resnet3d18--fold0", age_s=0.0)
    info = holder(path.parent)
    assert not is_stale(info, 30.0) and is_stale({**info, "age_s": 91.0}, 30.0)
    other = Claim(path.parent, 30.0)
    assert not other.acquire() and other.other["host"] == "another-machine"
    assert main(["study", str(study), "--out", str(out), "--print-runs"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 12 and lines[0].split("\t")[:3] == ["0", "new", "another-machine:4242"]
    assert all(line.split("\t")[2] == "-" for line in lines[1:])
    assert not (out / "runs/scale--resnet3d18--fold1").exists()  # listing trains nothing


@pytest.mark.parametrize("beat", [0, -1])
def test_heartbeat_must_be_positive(tmp_path, fake_data, beat):
    from stacktrain.train.study.config import StudyError, load_study
    with pytest.raises(StudyError, match="study.heartbeat_s"):
        load_study(grid(tmp_path, fake_data, beat))


def _hparams_sessions(logdir):
    """Per event file under `logdir`: the HParams session's hyper-parameters, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    data = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    start = data.session_start_info.hparams
    return {k: (v.string_value or v.number_value) for k, v in start.items()}, acc.Tags()["scalars"]


def test_every_study_run_has_tensorboard_hparams(tmp_path, fake_data):
    out = run_study(grid(tmp_path, fake_data), tmp_path / "out", trainer=FAKE, console=Console(file=io.StringIO()))
    run = out / "runs/percentile--resnet3d50--fold1"
    hp, scalars = _hparams_sessions(run / "tensorboard")
    assert hp["variant"] == "percentile" and hp["model"] == "resnet3d50" and hp["fold"] == 1
    assert hp["preprocess.normalize"] == "percentile"
    assert {"best/stack_f1_MALADE", "best/val_loss"} <= set(scalars)
    results = load_results(run / RESULTS_NAME)
    assert hp["train.seed"] == results["config"]["train"]["seed"]
