"""A run always makes progress: a kill between an epoch's writes, a kill before the first last.pt, or a
diverged loss never leaves a run that can neither be resumed nor restarted, nor a "finished" run whose
checkpoints disagree with its results."""

from __future__ import annotations

import math

import pytest
import torch

from stacktrain.errors import ConfigError, EvalError
from stacktrain.train import checkpoint as ckpts
from stacktrain.train import loop
from stacktrain.train.results import RESULTS_NAME, load_results, strip_timing
from tests.support import tiny_config, tiny_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"))


class Killed(BaseException):
    """Stands in for SIGKILL inside the process: nothing after it runs (not an Exception: no handler)."""


def best_pt_epoch(run_dir) -> int:
    return int(torch.load(run_dir / ckpts.BEST, map_location="cpu", weights_only=True)["epoch"])


def test_a_kill_after_the_last_epochs_results_is_completed_by_resume(data, tmp_path, monkeypatch):
    clean = load_results(loop.train(tiny_config(*data), run_dir=tmp_path / "clean"))
    run_dir = tmp_path / "killed"
    real_save = ckpts.save_checkpoint

    def save_then_die(path, **state):  # the last epoch's results are written, its last.pt is not
        if state["epoch"] == 1:
            raise Killed
        real_save(path, **state)
    monkeypatch.setattr(ckpts, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        loop.train(tiny_config(*data), run_dir=run_dir)
    monkeypatch.setattr(ckpts, "save_checkpoint", real_save)
    cut = load_results(run_dir / RESULTS_NAME)
    assert cut["stop_reason"] is None and len(cut["epochs"]) == 2  # not "finished": a study resumes it
    resumed = load_results(loop.train(tiny_config(*data), run_dir=run_dir, resume=True))
    assert strip_timing(resumed) == strip_timing(clean)
    assert best_pt_epoch(run_dir) == resumed["best_epoch"]


def test_a_kill_between_last_pt_and_best_pt_is_repaired(data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_copy = ckpts.copy_checkpoint
    monkeypatch.setattr(ckpts, "copy_checkpoint", lambda src, dst: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):  # epoch 0 improves: its last.pt is written, best.pt is not
        loop.train(tiny_config(*data, "train.epochs=1"), run_dir=run_dir)
    monkeypatch.setattr(ckpts, "copy_checkpoint", real_copy)
    assert not (run_dir / ckpts.BEST).exists()
    results = load_results(loop.train(tiny_config(*data, "train.epochs=1"), run_dir=run_dir, resume=True))
    assert results["stop_reason"] == "max_epochs" and best_pt_epoch(run_dir) == results["best_epoch"] == 0


def test_resume_before_the_first_last_pt_starts_afresh(data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(ckpts, "save_checkpoint", lambda path, **state: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        loop.train(tiny_config(*data, "train.epochs=1"), run_dir=run_dir)
    monkeypatch.undo()
    assert (run_dir / RESULTS_NAME).exists() and not (run_dir / ckpts.LAST).exists()
    results = load_results(loop.train(tiny_config(*data, "train.epochs=1"), run_dir=run_dir, resume=True))
    assert results["stop_reason"] == "max_epochs" and len(results["epochs"]) == 1


def test_a_diverged_loss_is_one_clear_error(data, tmp_path, monkeypatch):
    real_epoch = loop.train_epoch
    monkeypatch.setattr(loop, "train_epoch", lambda *a, **k: (math.nan, real_epoch(*a, **k)[1]))
    with pytest.raises(EvalError, match="epoch 0 diverged .* lower optim.lr"):
        loop.train(tiny_config(*data, "train.epochs=1"), run_dir=tmp_path / "nan")


@pytest.mark.parametrize("sets", [["data.val_part=test"], ["data.train_part=test"], ["data.val_part=train"]])
def test_no_run_selects_on_the_test_part_or_trains_on_its_validation(data, tmp_path, sets):
    with pytest.raises(ConfigError, match="neither the held-out \"test\" part"):
        loop.train(tiny_config(*data, "train.epochs=1", *sets), run_dir=tmp_path / "r")
