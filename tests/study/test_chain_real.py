"""Phase 1 -> 2 -> 3 -> final, end to end on the CPU with the demo preset, the real trainer and a tiny
budget (one epoch per run): the chain, the held-out test part read once, and the report."""

from __future__ import annotations

import json

from rich.console import Console

from stacktrain.testing import tissue, write_array
from stacktrain.train.split import make_splits, write_split
from stacktrain.train.study.report import report
from stacktrain.train.study.runner import read_manifest, run_study
from tests.support import REAL, VARIANTS, hpo_body, write_study

QUIET = Console(quiet=True)
SETS = ("train.epochs=1", "loader.batch_size=4", "loader.workers=0", "train.log_interval=1")


def test_three_phases_and_the_final_step_on_the_cpu(tmp_path):
    store = tmp_path / "store.zarr"
    for i in range(12):  # 12 stacks of 6 patients, one label per patient
        write_array(store, f"s{i:02d}", tissue((3, 16, 64, 64), seed=i), label="MALADE" if (i // 2) % 2 else "SAIN",
                    group=f"p{i // 2}", chunk_zyx=(16, 64, 64), shard_zyx=(16, 64, 64))
    split = tmp_path / "split.json"
    write_split(make_splits(store, folds=2, test_fraction=0.3, seed=0), split)
    test_ids = json.loads(split.read_text())["folds"][0]["test"]
    assert test_ids

    p1 = run_study(write_study(tmp_path / "p1.toml", store, split, VARIANTS, sets=SETS), tmp_path / "phase1",
                   trainer=REAL, console=QUIET)
    p2_file = write_study(tmp_path / "p2.toml", store, None, "[models.resnet3d18]\n", sets=SETS, base=p1)
    p2 = run_study(p2_file, tmp_path / "phase2", trainer=REAL, console=QUIET)
    p3_file = write_study(tmp_path / "p3.toml", store, None, hpo_body(trials=1), sets=SETS, base=p2)
    p3 = run_study(p3_file, tmp_path / "phase3", trainer=REAL, final=True, console=QUIET)

    chosen = json.loads((p1 / "selection.json").read_text())["config"]["preprocess"]["normalize"]
    trial = json.loads((p3 / "trials/trial-0000/fold0/study_run.json").read_text())["config"]
    assert trial["preprocess"]["normalize"] == chosen  # phase 1's selection reached phase 3
    assert [c["name"] for c in read_manifest(p3)["chain"]] == ["p1", "p2"]
    final = json.loads((p3 / "final.json").read_text())
    assert sorted(s["stack_id"] for s in final["stacks"]) == sorted(test_ids) and len(final["per_run"]) == 2
    for run in p1.glob("runs/*/training_results.json"):  # no selection read a test stack
        volumes = json.loads(run.read_text())["epochs"][0]["volumes"]
        assert not {v["stack_id"] for v in volumes} & set(test_ids)
    result = report(p3, n_resamples=50, plots=False, console=QUIET)
    assert result["final"]["label"] == "trial-0"
    assert "## Held-out test part" in (p3 / "report.md").read_text()
