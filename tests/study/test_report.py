"""`stacktrain report`: its numbers equal a recomputation from the runs' JSON; files, verdict, notes.

Runs come from the fake trainer (tests/test_study.py): quality 0.9 (percentile), 0.6 (scale) and 0.3
(meanstd), so the winner and the size of the gaps are known.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from rich.console import Console

from stacktrain.cli import main
from stacktrain.train.results import RESULTS_NAME, load_results
from stacktrain.train.study.config import StudyError
from stacktrain.train.study.report import report
from stacktrain.train.study.runner import run_study
from tests.support import FAKE, write_study

THREE = """
[variants.scale]
preprocess = { normalize = "scale" }
[variants.percentile]
preprocess = { normalize = "percentile" }
[variants.meanstd]
preprocess = { normalize = "meanstd", mean = [100.0, 100.0, 100.0], std = [50.0, 50.0, 50.0] }
"""
TWINS = """
[variants.scale]
preprocess = { normalize = "scale" }
[variants.scale-again]
description = "the same preprocessing under another name: nothing can separate them"
preprocess = { normalize = "scale" }
"""


def study_dir(tmp_path, fake_data, body, name="s"):
    store, split = fake_data
    study = write_study(tmp_path / f"{name}.toml", store, split, body,
                        sets=("train.epochs=3", "train.select_level=patch"))
    out = tmp_path / f"{name}-out"
    run_study(study, out, trainer=FAKE, console=Console(quiet=True))
    return out


def best_entry(path):
    res = load_results(path)
    return next(e for e in res["epochs"] if e["epoch"] == res["best_epoch"])


def test_report_numbers_equal_a_recomputation_from_the_json(tmp_path, fake_data):
    out = study_dir(tmp_path, fake_data, THREE)
    result = report(out, n_resamples=300, console=Console(quiet=True))
    assert [(r.label, r.level) for r in result["rows"]] == [
        (v, lv) for v in ("scale", "percentile", "meanstd") for lv in ("patch", "stack")]
    entries = {v: [best_entry(out / f"runs/{v}--resnet3d18--fold{f}" / RESULTS_NAME) for f in range(3)]
               for v in ("scale", "percentile", "meanstd")}
    with open(out / "report.csv") as f:
        table = {(row["variant"], row["level"]): row for row in csv.DictReader(f)}
    for r in result["rows"]:
        metrics = [e["patch_metrics" if r.level == "patch" else "volume_metrics"] for e in entries[r.label]]
        values = {"f1_malade": [m["f1"]["MALADE"] for m in metrics], "f1_sain": [m["f1"]["SAIN"] for m in metrics],
                  "accuracy": [m["accuracy"] for m in metrics], "roc_auc": [m["roc_auc"] for m in metrics]}
        for name, v in values.items():
            assert r.mean[name] == pytest.approx(np.mean(v)) and r.std[name] == pytest.approx(np.std(v, ddof=1))
            assert float(table[r.label, r.level][f"{name}_mean"]) == pytest.approx(np.mean(v))
            lo, hi = r.ci[name]
            assert lo <= hi and float(table[r.label, r.level][f"{name}_ci_low"]) == pytest.approx(lo)
        assert r.n_stacks == 24 and r.folds == [0, 1, 2]
        assert r.best_epochs == [load_results(out / f"runs/{r.label}--resnet3d18--fold{f}" / RESULTS_NAME)
                                 ["best_epoch"] for f in range(3)]
        assert r.throughput == pytest.approx(101.0)  # the fake's epochs run at 100, 101, 102 patches/s
    with open(out / "differences.csv") as f:
        diffs = {(row["variant"], row["level"]): row for row in csv.DictReader(f)}
    assert set(diffs) == {(v, lv) for v in ("percentile", "meanstd") for lv in ("patch", "stack")}
    for v in ("percentile", "meanstd"):
        per_fold = [a["patch_metrics"]["f1"]["MALADE"] - b["patch_metrics"]["f1"]["MALADE"]
                    for a, b in zip(entries[v], entries["scale"])]
        assert float(diffs[v, "patch"]["f1_malade_mean"]) == pytest.approx(np.mean(per_fold))
        assert diffs[v, "patch"]["baseline"] == "scale"
    assert result["verdict"].startswith("Best: percentile, patch-level F1 MALADE")
    assert "The evidence separates it from the runner-up" in result["verdict"] and "scale" in result["verdict"]
    md = (out / "report.md").read_text()
    assert result["verdict"] in md and "| percentile | patch | 3 | 24 |" in md and "![stack_f1](stack_f1.png)" in md
    for name in ("stack_f1.png", "learning_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identical_variants_are_not_separated(tmp_path, fake_data):
    out = study_dir(tmp_path, fake_data, TWINS, name="twins")
    result = report(out, n_resamples=200, plots=False, console=Console(quiet=True))
    assert "does not separate it from the runner-up" in result["verdict"]
    assert "+0.000 (95% CI [+0.000, +0.000]" in result["verdict"]
    assert not (out / "stack_f1.png").exists()


def test_unfinished_runs_are_left_out_with_a_note(tmp_path, fake_data):
    out = study_dir(tmp_path, fake_data, THREE, name="partial")
    path = out / "runs/meanstd--resnet3d18--fold1" / RESULTS_NAME
    res = json.loads(path.read_text())
    res["stop_reason"], res["epochs"] = None, res["epochs"][:1]
    path.write_text(json.dumps(res))
    result = report(out, n_resamples=100, plots=False, console=Console(quiet=True))
    meanstd = [r for r in result["rows"] if r.label == "meanstd"]
    assert all(r.folds == [0, 2] for r in meanstd)
    assert any("1 run(s) unfinished" in n and "meanstd--resnet3d18--fold1" in n for n in result["notes"])


def test_cli_prints_the_table_and_refuses_a_non_study_directory(tmp_path, fake_data, capsys):
    out = study_dir(tmp_path, fake_data, TWINS, name="cli")
    assert main(["report", str(out), "--resamples", "50", "--level", "stack", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "stack level: mean ± std over runs" in printed and "Best: scale" in printed
    with pytest.raises(StudyError, match="not a study directory"):
        report(tmp_path, console=Console(quiet=True))


def test_unequal_optimizer_budgets_are_reported(tmp_path, fake_data):
    body = TWINS.replace('[variants.scale-again]', '[variants.scale-again]\npatch = { stride = [16, 16, 16] }')
    out = study_dir(tmp_path, fake_data, body, name="budget")
    notes = report(out, n_resamples=50, plots=False, console=Console(quiet=True))["notes"]
    assert any("optimizer budgets differ" in n and "scale 10" in n and "scale-again 40" in n for n in notes)
    same = report(study_dir(tmp_path, fake_data, TWINS, name="same"), n_resamples=50, plots=False,
                  console=Console(quiet=True))["notes"]
    assert not any("budgets differ" in n for n in same)


def test_report_of_a_single_run(tmp_path, fake_data):
    """`stacktrain report RUN_DIR`: the per-epoch table, the curves and the best epoch's patient CIs."""
    from stacktrain.train.study.runner import run_study
    store, split = fake_data
    out = run_study(write_study(tmp_path / "one.toml", store, split, "", head="folds = [0]"), tmp_path / "out",
                    trainer=FAKE)
    run = next((out / "runs").iterdir())
    assert main(["report", str(run), "--resamples", "200"]) == 0
    results = load_results(run / RESULTS_NAME)
    rows = list(csv.DictReader((run / "epochs.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [e["epoch"] for e in results["epochs"]]
    best = results["epochs"][results["best_epoch"]]
    assert float(rows[results["best_epoch"]]["stack_f1_MALADE"]) == best["volume_metrics"]["f1"]["MALADE"]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    text = (run / "report.md").read_text()
    assert f"Best epoch {results['best_epoch']}" in text and "| stack |" in text
