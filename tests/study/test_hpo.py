"""Phase 3: an Optuna study on SQLite runs, prunes, resumes (topped up, and after a kill), and reports.

The fake trainer (tests/test_study.py) scores higher with a higher learning rate, so the enqueued
base trial (lr 1e-3, the top of the space) leads at every epoch and the median pruner stops the others.
"""

from __future__ import annotations

import json

import optuna
import pytest
from rich.console import Console

from stacktrain.train.results import RESULTS_NAME, load_results
from stacktrain.train.study.config import StudyError, load_study
from stacktrain.train.study.hpo import load_space
from stacktrain.train.study.runner import read_manifest, run_study
from stacktrain.train.study.runs import RUN_RECORD
from tests.support import FAKE, log_lines, run_killed, write_study

HPO = """
[hpo]
trials = 3
folds = [0, 1]
seed = 0
pruner = { kind = "median", startup_trials = 1, warmup_epochs = 0 }
[hpo.space]
"optim.lr" = { type = "float", low = 1e-4, high = 1e-3, log = true }
"loader.batch_size" = { type = "categorical", choices = [8, 16] }
"""


def hpo_study(tmp_path, fake_data, body=HPO, name="hpo"):
    store, split = fake_data
    return write_study(tmp_path / f"{name}.toml", store, split, body,
                       sets=("train.epochs=3", "train.select_level=patch"))


def trials_of(out):
    return optuna.load_study(study_name="hpo", storage=f"sqlite:///{out / 'optuna.db'}").trials


def test_three_trials_run_prune_and_top_up(tmp_path, fake_data, monkeypatch):
    study, out, log = hpo_study(tmp_path, fake_data), tmp_path / "out", tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    run_study(study, out, trials=2, trainer=FAKE)
    first = trials_of(out)
    assert [t.state.name for t in first] == ["COMPLETE", "PRUNED"]
    assert first[0].params == {"optim.lr": 1e-3, "loader.batch_size": 16}  # the enqueued base config
    pruned = load_results(out / "trials/trial-0001/fold0" / RESULTS_NAME)
    assert pruned["stop_reason"] == "pruned" and len(pruned["epochs"]) < 3
    assert not (out / "trials/trial-0001/fold1").exists()  # a pruned trial trains no further fold
    base = [load_results(out / f"trials/trial-0000/fold{f}" / RESULTS_NAME) for f in (0, 1)]
    expected = sum(r["epochs"][r["best_epoch"]]["patch_metrics"]["f1"]["MALADE"] for r in base) / 2
    assert first[0].value == pytest.approx(expected)
    assert set(first[0].intermediate_values) == {0, 1, 2, 3, 4, 5}  # fold 1 reports at steps 3..5
    record = json.loads((out / "trials/trial-0001/fold0" / RUN_RECORD).read_text())
    assert record["label"] == "trial-1" and record["config"]["optim"]["lr"] == first[1].params["optim.lr"]
    assert record["config"]["loader"]["batch_size"] == first[1].params["loader.batch_size"]

    from tests.study.test_grid_shared import _hparams_sessions
    hp, _ = _hparams_sessions(out / "trials/trial-0000/fold1/tensorboard")  # TensorBoard's HParams row
    assert hp["optim.lr"] == pytest.approx(1e-3) and hp["trial"] == 0 and hp["fold"] == 1
    assert not (out / "trials/trial-0001/fold0/tensorboard").exists()  # a pruned run has no row

    log.unlink()
    run_study(study, out, trainer=FAKE)  # hpo.trials = 3: one more, nothing redone
    assert len(trials_of(out)) == 3
    assert {c["run"].split("/")[1] for c in log_lines(log)} == {"trial-0002"}
    manifest = read_manifest(out)
    assert manifest["kind"] == "hpo" and manifest["hpo"]["folds"] == [0, 1]


def test_a_killed_trial_is_resumed_in_its_own_directory(tmp_path, fake_data, monkeypatch):
    study, out, log = hpo_study(tmp_path, fake_data, HPO.replace('kind = "median"', 'kind = "none"')), \
        tmp_path / "out", tmp_path / "calls.jsonl"
    run_killed(study, out, FAKE, {"FAKE_LOG": str(log), "FAKE_KILL": "trial-0001/fold0:1"}, tmp_path)
    killed = load_results(out / "trials/trial-0001/fold0" / RESULTS_NAME)
    assert len(killed["epochs"]) == 1
    log.unlink()
    monkeypatch.setenv("FAKE_LOG", str(log))
    run_study(study, out, trainer=FAKE)
    states = [t.state.name for t in trials_of(out)]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]  # 1 failed; 2 redid it; 3 is new
    calls = log_lines(log)
    assert calls[0] == {"run": "trials/trial-0001/fold0", "resume": True}
    assert calls[1] == {"run": "trials/trial-0001/fold1", "resume": False}
    assert {c["run"].split("/")[1] for c in calls[2:]} == {"trial-0003"}
    trials = trials_of(out)
    assert trials[2].params == trials[1].params and trials[2].user_attrs["run_number"] == 1
    assert len(load_results(out / "trials/trial-0001/fold0" / RESULTS_NAME)["epochs"]) == 3


def test_report_of_an_hpo_study_has_optuna_plots(tmp_path, fake_data):
    from stacktrain.train.study.report import report
    study, out = hpo_study(tmp_path, fake_data, HPO.replace('kind = "median"', 'kind = "none"')), tmp_path / "out"
    run_study(study, out, trainer=FAKE)
    result = report(out, n_resamples=50, console=Console(quiet=True))
    labels = {r.label for r in result["rows"]}
    assert labels == {"trial-0", "trial-1", "trial-2"}
    assert {d.other for d in result["diffs"]} == {"trial-0"}  # the base config is the baseline
    assert "trial-0" in result["verdict"] and "picked among 3 trials" in result["verdict"]
    for name in ("optuna_history.png", "optuna_importances.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("space, message", [
    ('"optim.lrate" = { type = "float", low = 1e-4, high = 1e-3 }', r"unknown key optim\.lrate"),
    ('"optim.lr" = { type = "uniform", low = 1e-4, high = 1e-3 }',
     r"hpo\.space\.optim\.lr\.type = 'uniform': choose one of float, int, categorical"),
    ('"optim.lr" = { type = "float", low = 0.0, high = 1e-3, log = true }', "log scale needs low > 0"),
    ('"loader.batch_size" = { type = "categorical", choices = ["big"] }', "loader.batch_size"),
])
def test_bad_search_spaces_are_refused(tmp_path, fake_data, space, message):
    study = hpo_study(tmp_path, fake_data, f"[hpo]\ntrials = 2\n[hpo.space]\n{space}\n")
    with pytest.raises(StudyError, match=message):
        load_space(load_study(study))


@pytest.mark.parametrize("level, key, refused", [("patch", "train.aggregate", True),
                                                 ("stack", "train.aggregate", False),
                                                 ("stack", "train.select_level", True)])
def test_the_space_holds_only_dimensions_that_can_change_the_objective(tmp_path, fake_data, level, key, refused):
    choices = '["patch", "stack"]' if key == "train.select_level" else '["mean", "topk"]'
    body = HPO + f'"{key}" = {{ type = "categorical", choices = {choices} }}\n'
    store, split = fake_data
    study = load_study(write_study(tmp_path / "s.toml", store, split, body,
                                   sets=("train.epochs=3", f"train.select_level={level}")))
    if refused:
        with pytest.raises(StudyError, match=f"hpo.space.{key}: .*only dimensions that can change the objective"):
            load_space(study)
    else:
        assert key in load_space(study)
