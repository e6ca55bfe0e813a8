"""Phases that chain (base = the previous study directory), the held-out test part, and `--final`.

With the fake trainer (tests/support.py) `percentile` beats `scale` in phase 1, so phase 2 must run on
`percentile` without the file saying so; phase 3 tunes phase 2's selected model on it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.console import Console

from stacktrain.train.split import load_split, make_splits, write_split
from stacktrain.train.study.config import StudyError, load_study
from stacktrain.train.study.final import run_final
from stacktrain.train.study.report import report
from stacktrain.train.study.runner import read_manifest, run_study
from stacktrain.train.study.runs import RUN_RECORD, record_config
from stacktrain.train.study.selection import read_selection
from tests.support import FAKE, VARIANTS, hpo_body, make_store, write_study

QUIET = Console(quiet=True)
PHASE2 = "[models.resnet3d18]\n[models.resnet3d50]\n"
PHASE3 = hpo_body(trials=2)


@pytest.fixture(scope="module")
def test_split_data(tmp_path_factory):
    """24 stacks, 12 patients: a test part of 1/4 of the patients and 3 folds of the rest, in one call."""
    root = tmp_path_factory.mktemp("chain")
    store, _ = make_store(root)
    write_split(make_splits(store, folds=3, test_fraction=0.25, seed=0), root / "split-test.json")
    return store, root / "split-test.json"


def phase(tmp_path, name, store, split, body, base=None, sets=("train.epochs=3",)):
    return write_study(tmp_path / f"{name}.toml", store, split or None, body, sets=sets, base=base)


def fake_evaluate(checkpoint, store, stacks, config, out):
    """The fake trainer's 'model' on the test part: better with its quality, like its validation; its
    threshold 0.5."""
    from stacktrain.stores.reader import Store
    from stacktrain.train.config import config_from_dict
    from tests.support import quality
    q = quality(config_from_dict(config))
    st = Store(store)
    return {s: 0.5 + (st.meta(s).label_index - 0.5) * q * (0.5 + 0.5 * (i % 3) / 2)
            for i, s in enumerate(stacks)}, 0.5


def test_phases_chain_and_the_final_step_reads_the_test_part_once(tmp_path, test_split_data):
    store, split = test_split_data
    p1 = run_study(phase(tmp_path, "p1", store, split, VARIANTS), tmp_path / "phase1", trainer=FAKE, console=QUIET)
    assert read_selection(p1, "")["label"] == "percentile"
    test_ids = set(load_split(split)["folds"][0]["test"])
    for record in p1.glob(f"runs/*/{RUN_RECORD}"):  # no run trained or validated on a test stack
        run = json.loads(record.read_text())
        parts = load_split(record_config(run, record.parent)["data"]["split"])["folds"][run["fold"]]
        assert test_ids.isdisjoint(parts["train"]) and test_ids.isdisjoint(parts["val"])

    p2_file = phase(tmp_path, "p2", store, "", PHASE2, base=p1)  # the split comes with the base
    p2 = run_study(p2_file, tmp_path / "phase2", trainer=FAKE, console=QUIET)
    configs = [json.loads(r.read_text())["config"] for r in p2.glob(f"runs/*/{RUN_RECORD}")]
    assert len(configs) == 6 and {c["preprocess"]["normalize"] for c in configs} == {"percentile"}
    chain = read_manifest(p2)["chain"]
    assert [(c["name"], c["selected"]) for c in chain] == [("p1", "percentile")]

    p3 = run_study(phase(tmp_path, "p3", store, "", PHASE3, base=p2), tmp_path / "phase3", trainer=FAKE,
                   console=QUIET)
    manifest = read_manifest(p3)
    assert [c["name"] for c in manifest["chain"]] == ["p1", "p2"]
    selected = read_selection(p3, "")
    assert selected["label"].startswith("trial-") and selected["config"]["preprocess"]["normalize"] == "percentile"
    assert selected["config"]["model"]["name"] == read_selection(p2, "")["model"]

    final = run_final(p3, evaluate=fake_evaluate, console=QUIET)
    assert sorted(s["stack_id"] for s in final["stacks"]) == sorted(test_ids)
    assert len(final["per_run"]) == 2 and final["volume_metrics"]["roc_auc"] is not None
    calls = []
    again = run_final(p3, evaluate=lambda *a: calls.append(a), console=QUIET)
    assert again == final and calls == []  # evaluated once: a second --final reads the record
    result = report(p3, n_resamples=50, plots=False, console=QUIET)
    md = (p3 / "report.md").read_text()
    assert result["final"] == final and "## Held-out test part" in md and "Evaluated once" in md
    assert "## Chain of phases" in md and "`p1`" in md and "## Per run" in md


def test_a_chain_with_another_split_is_refused(tmp_path, test_split_data):
    store, split = test_split_data
    p1 = run_study(phase(tmp_path, "p1", store, split, VARIANTS, sets=("train.epochs=2",)), tmp_path / "a",
                   trainer=FAKE, console=QUIET)
    other = tmp_path / "other.json"
    write_split(make_splits(store, folds=3, test_fraction=0.25, seed=1), other)
    with pytest.raises(StudyError, match=r"not the split of the base study .*phases chain on one split file"):
        run_study(phase(tmp_path, "p2", store, other, PHASE2, base=p1), tmp_path / "b", trainer=FAKE,
                  console=QUIET)
    unfinished = tmp_path / "c"
    unfinished.mkdir()
    (unfinished / "study.json").write_text(json.dumps({"format_version": 1, "name": "c", "split_sha256": "x"}))
    with pytest.raises(StudyError, match="has not finished"):
        load_study(phase(tmp_path, "p2b", store, split, PHASE2, base=unfinished))


def test_final_needs_a_test_part(tmp_path, fake_data):
    store, split = fake_data  # 3 folds, no test part
    out = run_study(phase(tmp_path, "nt", store, split, VARIANTS, sets=("train.epochs=2",)), tmp_path / "nt",
                    trainer=FAKE, console=QUIET)
    with pytest.raises(StudyError, match="no test part"):
        run_final(out, evaluate=fake_evaluate, console=QUIET)


def test_seeds_repeat_every_run_and_the_report_lists_them(tmp_path, fake_data):
    store, split = fake_data
    study = phase(tmp_path, "seeds", store, split, VARIANTS, sets=("train.epochs=2",))
    study.write_text(study.read_text().replace("[study]\n", "[study]\nseeds = [3, 4]\nfolds = [0, 1]\n"))
    out = run_study(study, tmp_path / "seeds-out", trainer=FAKE, console=QUIET)
    runs = sorted(p.parent.name for p in out.glob(f"runs/*/{RUN_RECORD}"))
    assert len(runs) == 8 and "percentile--resnet3d18--fold1--seed4" in runs
    record = json.loads((out / "runs/scale--resnet3d18--fold0--seed3" / RUN_RECORD).read_text())
    assert record["seed"] == 3 and record["config"]["train"]["seed"] == 3 and record["config"]["loader"]["seed"] == 3
    result = report(out, n_resamples=50, plots=False, console=QUIET)
    row = next(r for r in result["rows"] if r.label == "scale" and r.level == "stack")
    assert row.runs == [(0, 3), (0, 4), (1, 3), (1, 4)] and row.folds == [0, 1]
    assert row.mean["f1_malade"] == pytest.approx(np.mean(row.fold_values["f1_malade"]))
    md = (out / "report.md").read_text()
    assert "| scale | 1 | 4 |" in md  # the per-run table: label, fold, seed
    assert "fewer than about 10" in result["verdict"]  # 2 patients per class per fold here


def test_a_study_directory_moved_with_its_store_still_reports_and_evaluates(tmp_path):
    """Run records and selection.json hold paths relative to themselves: the whole project moved (or
    mounted elsewhere on another machine), `report` finds the patients and `--final` the store."""
    project = tmp_path / "project"
    store, _ = make_store(project / "data")
    split = project / "data" / "split-test.json"
    write_split(make_splits(store, folds=3, test_fraction=0.25, seed=0), split)
    out = run_study(phase(project, "p1", store, split, VARIANTS), project / "studies" / "p1", trainer=FAKE,
                    console=QUIET)
    for record in out.glob(f"runs/*/{RUN_RECORD}"):
        assert str(project) not in json.dumps(json.loads(record.read_text())["config"])
    assert str(project) not in json.dumps(read_selection(out, "")["config"])
    moved = tmp_path / "elsewhere"
    project.rename(moved)
    final = run_final(moved / "studies" / "p1", evaluate=fake_evaluate, console=QUIET)
    assert final["n_patients"] >= 2 and final["volume_metrics"]["roc_auc"] is not None
    assert report(moved / "studies" / "p1", n_resamples=50, plots=False, console=QUIET)["rows"]
