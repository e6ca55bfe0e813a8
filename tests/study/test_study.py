"""`stacktrain study`: a tiny real study end to end (killed, then resumed), and the grid runner's rules.

The fake trainer below (also used by test_report.py and test_hpo.py) writes schema-valid results in
milliseconds: its patch probabilities get better with a quality set by the config (normalisation and
learning rate), so studies have known winners. FAKE_LOG records every call; FAKE_KILL=SUBSTRING:EPOCH
makes the process SIGKILL itself at that epoch of the run whose directory contains SUBSTRING.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest

from stacktrain.cli import main
from stacktrain.train.results import RESULTS_NAME, load_results, strip_timing
from stacktrain.train.study.config import StudyError, load_study
from stacktrain.train.study.runner import run_study
from stacktrain.train.study.runs import RUN_RECORD
from tests.support import FAKE, REAL, ROOT, VARIANTS, log_lines, make_store, run_killed, write_study


# -- the real thing --------------------------------------------------------------------------------
def test_tiny_real_study_killed_resumes_and_reports(tmp_path, monkeypatch):
    """2 variants x 2 folds, tiny model, 2 epochs: killed in its third run, resumed, then reported."""
    from stacktrain.train.study.report import report
    store, split = make_store(tmp_path, n=4, shape=(16, 64, 64), folds=2)
    study = write_study(tmp_path / "tiny.toml", store, split, VARIANTS,
                        sets=("train.epochs=2", "loader.batch_size=4", "train.log_interval=1"))
    out, log = tmp_path / "out", tmp_path / "calls.jsonl"
    run_killed(study, out, REAL,
               {"FAKE_LOG": str(log), "FAKE_KILL": "percentile--resnet3d18--fold0:0"}, tmp_path)
    runs = [f"runs/{v}--resnet3d18--fold{f}" for v in ("scale", "percentile") for f in (0, 1)]
    assert [c["run"] for c in log_lines(log)] == runs[:3]
    before = {r: (out / r / RESULTS_NAME).read_bytes() for r in runs[:2]}
    killed = load_results(out / runs[2] / RESULTS_NAME)
    assert [e["epoch"] for e in killed["epochs"]] == [0] and killed["stop_reason"] is None

    log.unlink()
    monkeypatch.setenv("FAKE_LOG", str(log))
    run_study(study, out, trainer=REAL)
    assert log_lines(log) == [{"run": runs[2], "resume": True}, {"run": runs[3], "resume": False}]
    assert all((out / r / RESULTS_NAME).read_bytes() == before[r] for r in runs[:2])  # not redone
    resumed = load_results(out / runs[2] / RESULTS_NAME)
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1] and resumed["stop_reason"] == "max_epochs"
    assert strip_timing(resumed["epochs"][0]) == strip_timing(killed["epochs"][0])
    split_sha = json.loads(split.read_text())["sha256"]
    for r in runs:
        record = json.loads((out / r / RUN_RECORD).read_text())
        assert record["split_sha256"] == split_sha
        assert record["config"]["preprocess"] == load_results(out / r / RESULTS_NAME)["config"]["preprocess"]

    result = report(out, n_resamples=200)
    assert [(r.label, r.level) for r in result["rows"]] == [
        ("scale", "patch"), ("scale", "stack"), ("percentile", "patch"), ("percentile", "stack")]
    for row in result["rows"]:
        entries = []
        for fold in (0, 1):
            res = load_results(out / f"runs/{row.label}--resnet3d18--fold{fold}" / RESULTS_NAME)
            entries.append(next(e for e in res["epochs"] if e["epoch"] == res["best_epoch"]))
        key = "patch_metrics" if row.level == "patch" else "volume_metrics"
        f1 = [e[key]["f1"]["MALADE"] for e in entries]
        acc = [e[key]["accuracy"] for e in entries]
        assert row.mean["f1_malade"] == pytest.approx(np.mean(f1))
        assert row.std["f1_malade"] == pytest.approx(np.std(f1, ddof=1))
        assert row.mean["accuracy"] == pytest.approx(np.mean(acc))
        assert row.n_stacks == sum(len(e["volumes"]) for e in entries)
    assert {"report.md", "report.csv", "differences.csv", "stack_f1.png", "learning_curves.png"} <= {
        p.name for p in out.iterdir()}
    assert "Best:" in result["verdict"]


# -- the runner's rules, with the fake trainer ----------------------------------------------------
def test_parallel_workers_run_every_combination_once(tmp_path, fake_data, monkeypatch):
    store, split = fake_data
    study = write_study(tmp_path / "par.toml", store, split, VARIANTS + '[models.resnet3d18]\n[models.resnet3d50]\n',
                        head="folds = [0, 2]")
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    run_study(study, tmp_path / "out", workers=2, trainer=FAKE)
    expected = {f"runs/{v}--{m}--fold{f}" for v in ("scale", "percentile")
                for m in ("resnet3d18", "resnet3d50") for f in (0, 2)}
    assert sorted(c["run"] for c in log_lines(log)) == sorted(expected)
    record = json.loads((tmp_path / "out/runs/percentile--resnet3d50--fold2" / RUN_RECORD).read_text())
    assert record["label"] == "percentile/resnet3d50" and record["config"]["model"]["name"] == "resnet3d50"
    assert record["config"]["preprocess"]["normalize"] == "percentile" and record["config"]["data"]["fold"] == 2
    log.unlink()
    run_study(study, tmp_path / "out", workers=2, trainer=FAKE)
    assert not log.exists()  # everything finished: nothing is trained again


def test_a_changed_config_or_split_is_refused(tmp_path, fake_data):
    store, split = fake_data
    study = write_study(tmp_path / "s.toml", store, split, VARIANTS, head="folds = [0]")
    run_study(study, tmp_path / "out", trainer=FAKE)
    with pytest.raises(StudyError, match=r"train\.epochs: 3 -> 4.*new --out"):
        run_study(study, tmp_path / "out", overrides=["train.epochs=4"], trainer=FAKE)
    other = json.loads(split.read_text())
    other["folds"] = other["folds"][::-1]
    from stacktrain.train.split import split_hash
    other["sha256"] = split_hash(other["folds"])
    (tmp_path / "other.json").write_text(json.dumps(other))
    moved = write_study(tmp_path / "s2.toml", store, tmp_path / "other.json", VARIANTS, head="folds = [0]")
    with pytest.raises(StudyError, match="one split"):
        run_study(moved, tmp_path / "out", trainer=FAKE)


@pytest.mark.parametrize("body, head, message", [
    ('[variants.a]\npreprocess = { normalise = "scale" }', "", r"unknown key\(s\) preprocess\.normalise"),
    ('[variants.a]\nmodel = { name = "resnet3d18" }', "",
     r"unknown key\(s\) variants\.a\.model; valid keys of \[variants\.a\]: "
     "description, store, patch, preprocess, loader"),
    ('[variants."a b"]\n', "", "variant name 'a b'"),
    ("[models.nope]\n", "", "registered models"),
    (VARIANTS, 'baseline = "nope"', "study.baseline = 'nope'"),
    (VARIANTS, "folds = [0, 7]", r"has 3 fold\(s\)"),
    (VARIANTS, "colour = 1", r"unknown key\(s\) study\.colour"),
])
def test_bad_study_files_say_what_to_fix(tmp_path, fake_data, body, head, message):
    store, split = fake_data
    study = write_study(tmp_path / "bad.toml", store, split, body, head=head)
    with pytest.raises(StudyError, match=message):
        s = load_study(study)
        s.runs(tmp_path / "out", split)


def test_cli_parses_study_and_runs_it(tmp_path, fake_data, monkeypatch):
    from stacktrain.train.study import runner
    store, split = fake_data
    study = write_study(tmp_path / "cli.toml", store, split, VARIANTS, head="folds = [1]")
    monkeypatch.setattr(runner, "run_study", functools.partial(runner.run_study, trainer=FAKE))
    assert main(["study", str(study), "--out", str(tmp_path / "o"), "--set", "train.epochs=2"]) == 0
    res = load_results(tmp_path / "o/runs/scale--resnet3d18--fold1" / RESULTS_NAME)
    assert len(res["epochs"]) == 2


def fake_parent(path, name, model="resnet3d50"):
    """A finished study directory as phase 2 / 3 read it: study.json and selection.json."""
    from stacktrain.train.config import config_to_dict, load_config
    from stacktrain.train.split import load_split
    split = load_split("data/splits-5fold.json")
    cfg = config_to_dict(load_config("seed-gpu", ["data.store=data/store.zarr", "data.split=data/splits-5fold.json",
                                                  f"model.name={model}"]))
    path.mkdir(parents=True)
    (path / "study.json").write_text(json.dumps({"format_version": 1, "name": name, "split_sha256": split["sha256"],
                                                 "chain": []}))
    (path / "selection.json").write_text(json.dumps({"label": "x", "variant": "x", "model": model, "score": 0.9,
                                                     "level": "stack", "config": cfg}))


@pytest.mark.parametrize("name, runs", [("example-cpu", 12), ("phase1-preprocessing", 135),
                                        ("phase2-architectures", 75), ("phase3-hpo", 0)])
def test_committed_study_files_expand(tmp_path, fake_data, monkeypatch, name, runs):
    """The README's study files parse, and every run's config is valid (paths as the files give them);
    phases 2 and 3 start from the previous phase's study directory."""
    from stacktrain.train.split import load_split, split_hash, write_split
    from stacktrain.train.study.hpo import base_params, load_space
    split = load_split(fake_data[1])  # 3 folds, as the example expects; 5 for the phase files
    for rel, folds in (("example-out/splits.json", split["folds"]),
                       ("data/splits-5fold.json", split["folds"] + split["folds"][:2])):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write_split({"folds": folds, "sha256": split_hash(folds)}, tmp_path / rel)
    monkeypatch.chdir(tmp_path)
    fake_parent(tmp_path / "studies/phase1", "phase1-preprocessing")
    fake_parent(tmp_path / "studies/phase2", "phase2-architectures", model="resnet3d18")
    study = load_study(ROOT / f"train/study/presets/{name}.toml")
    if study.hpo is None:
        specs = study.runs(tmp_path / "out", tmp_path / "split.json")
        assert len(specs) == runs and study.baseline in {s.label for s in specs}
    else:
        space = load_space(study)
        assert study.parent["name"] == "phase2-architectures" and list(study.models) == ["resnet3d18"]
        assert base_params(study, space) == {"optim.lr": 1e-3, "optim.weight_decay": 1e-4, "loader.batch_size": 64,
                                             "optim.pos_weight": 1.0, "train.aggregate": "mean"}


def test_workers_take_the_visible_gpus_in_turn(monkeypatch):
    import multiprocessing

    import torch

    from stacktrain.train.study.runs import worker_setup
    threads = torch.get_num_threads()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    try:
        seen = []
        for _ in range(3):
            worker_setup(1, ["3", "5"], counter)
            seen.append(os.environ["CUDA_VISIBLE_DEVICES"])
    finally:
        torch.set_num_threads(threads)
    assert seen == ["3", "5", "3"] and counter.value == 3
