"""A real (tiny) training run: the results file is consistent, the run directory complete, pruning works.

The helpers `tiny_data` / `tiny_config` are shared by the other trainer test files. That a rerun of
the same config gives the same results (apart from timing) is checked by tests/test_resume.py, whose
clean run repeats in this process what the killed subprocess computed.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest

from stacktrain.pipelines.config import PatchConfig
from stacktrain.pipelines.patches import build_index
from stacktrain.stores.reader import Store
from stacktrain.train.checkpoint import BEST, LAST, load_checkpoint
from stacktrain.train.config import config_to_dict, load_config
from stacktrain.train.evaluator import binary_metrics
from stacktrain.train.loop import CONFIG_NAME, train
from stacktrain.train.results import RESULTS_NAME, load_results
from stacktrain.train.split import load_split
from tests.support import PATCH, tiny_config, tiny_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"))


def test_tiny_run(data, tmp_path):
    """One real run (one test, so that pytest-xdist workers do not each repeat it)."""
    run_dir = tmp_path / "tiny"
    path = train(tiny_config(*data), run_dir=run_dir)
    assert path == run_dir / RESULTS_NAME
    results = load_results(path)  # validates the schema
    check_results_file(results, data)
    check_run_directory(run_dir, results)
    train(tiny_config(*data), run_dir=run_dir, resume=True)  # resuming a finished run changes nothing
    assert load_results(path) == results


def check_results_file(results, data):
    """Volumes are the mean of their samples, metrics are recomputable, every val patch counts once."""
    store, splits = data
    assert [e["epoch"] for e in results["epochs"]] == [0, 1]
    assert results["stop_reason"] == "max_epochs" and results["best_epoch"] in (0, 1)
    val_ids = load_split(splits)["folds"][0]["val"]
    index = build_index(Store(store), val_ids, PatchConfig(size=PATCH))
    expected = sorted(index.key(r) for r in range(len(index)))
    for entry in results["epochs"]:
        samples = entry["samples"]
        assert sorted((s["stack_id"], tuple(s["position"])) for s in samples) == expected
        by_stack = defaultdict(list)
        for s in samples:
            by_stack[s["stack_id"]].append(s)
        assert [v["stack_id"] for v in entry["volumes"]] == val_ids
        for v in entry["volumes"]:
            mine = by_stack[v["stack_id"]]
            assert v["aggregated_probability"] == pytest.approx(np.mean([s["probability"] for s in mine]),
                                                                abs=1e-12)
            assert v["n_patches"] == len(mine) and {s["label"] for s in mine} == {v["label"]}
            assert v["predicted_label"] == int(v["aggregated_probability"] >= 0.5)
        volumes = entry["volumes"]
        assert binary_metrics([v["label"] for v in volumes],
                              [v["aggregated_probability"] for v in volumes]) == entry["volume_metrics"]
        assert binary_metrics([s["label"] for s in samples],
                              [s["probability"] for s in samples]) == entry["patch_metrics"]
        assert entry["throughput"]["train_patches_per_s"] > 0
        assert 0 <= entry["throughput"]["data_wait_pct"] <= 100


def check_run_directory(run_dir, results):
    cfg = load_config(run_dir / CONFIG_NAME)  # the resolved config loads back as it was recorded
    assert config_to_dict(cfg) == results["config"]
    last = load_checkpoint(run_dir / LAST, model_name="resnet3d18", model_tiny=True)
    best = load_checkpoint(run_dir / BEST)
    assert last["epoch"] == 1 and best["epoch"] == results["best_epoch"]
    assert last["early_stopping"]["best_epoch"] == results["best_epoch"]
    assert last["config"] == results["config"]
    assert last["data"]["intensity"]["dtype"] == "uint8"  # the store's mapping, which predict checks
    assert any((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # atomic writes left no temp
    assert results["environment"]["device"] == "cpu" and results["environment"]["world_size"] == 1


def test_on_epoch_can_prune_and_the_log_line_says_it_all(data, tmp_path, capsys):
    seen = []

    def on_epoch(epoch, entry):
        seen.append((epoch, entry["epoch"], entry["volume_metrics"]["f1"]["MALADE"]))
        return True  # an Optuna pruner that always prunes

    path = train(tiny_config(*data, "train.epochs=3"), run_dir=tmp_path / "pruned", on_epoch=on_epoch)
    results = json.loads(path.read_text())
    assert results["stop_reason"] == "pruned" and len(results["epochs"]) == 1
    assert seen == [(0, 0, results["epochs"][0]["volume_metrics"]["f1"]["MALADE"])]
    line = next(l for l in capsys.readouterr().err.splitlines() if l.startswith("epoch 0 (1/3)"))
    for part in ("| loss ", "| lr ", "patches/s", "| data-wait ", "% |", "| peak ", "GiB"):
        assert part in line

