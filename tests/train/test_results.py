"""training_results.json: built from a real evaluation, validated, rewritten atomically, timing strippable."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stacktrain.train.config import TrainConfig, config_to_dict
from stacktrain.train.evaluator import Evaluator, binary_metrics
from stacktrain.train.results import (
    RESULTS_SCHEMA,
    TIMING_KEYS,
    ResultsError,
    atomic_write,
    environment_info,
    epoch_entry,
    load_results,
    new_results,
    record_epoch,
    strip_timing,
    validate_results,
    write_results,
)
from stacktrain.train.results_io import ResultsWriter, epoch_line


def evaluation(seed):
    rng = np.random.default_rng(seed)
    ev = Evaluator([f"s{i}" for i in range(4)], aggregate="mean")
    for sidx in range(4):
        n = 3 + sidx
        pos = np.stack([np.arange(n) * 16, np.zeros(n, int), np.zeros(n, int)], axis=1)
        ev.add(np.full(n, sidx), pos, rng.normal(sidx % 2 - 0.5, 1.0, n), np.full(n, sidx % 2))
    return ev.finalize()


def results_with_epochs(n, wall=1.0):
    res = new_results(config_to_dict(TrainConfig()), environment_info("cpu"))
    for epoch in range(n):
        speed = {"train_patches_per_s": 100.0 * wall, "data_wait_pct": 3.0}
        entry = epoch_entry(epoch=epoch, train_loss=0.7 - 0.1 * epoch, lr=1e-3, evaluation=evaluation(epoch),
                            throughput=speed, wall_s=wall)
        record_epoch(res, entry, best_epoch=0, stop_reason="max_epochs" if epoch == n - 1 else None)
    return res


def test_written_file_is_valid_and_volumes_agree_with_samples(tmp_path):
    path = tmp_path / "training_results.json"
    res = results_with_epochs(3)
    write_results(path, res)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    back = json.loads(path.read_text())
    assert back == res and back["schema_version"] == 1 and back["stop_reason"] == "max_epochs"
    assert back["environment"]["versions"]["torch"] and back["environment"]["device"] == "cpu"
    for e in back["epochs"]:
        for v in e["volumes"]:  # aggregated_probability = mean of its samples' probabilities
            probs = [s["probability"] for s in e["samples"] if s["stack_id"] == v["stack_id"]]
            assert v["n_patches"] == len(probs)
            assert v["aggregated_probability"] == pytest.approx(np.mean(probs))
        again = binary_metrics(np.array([v["label"] for v in e["volumes"]]),
                               np.array([v["aggregated_probability"] for v in e["volumes"]]))
        assert again == e["volume_metrics"]
    assert load_results(path, upto_epoch=1)["epochs"][-1]["epoch"] == 1
    assert load_results(path, upto_epoch=1)["stop_reason"] is None


def test_schema_refuses_malformed_results(tmp_path):
    res = results_with_epochs(1)
    bad = json.loads(json.dumps(res))
    bad["epochs"][0]["volumes"][0]["aggregated_probability"] = 1.5
    del bad["epochs"][0]["patch_metrics"]["f1"]["MALADE"]
    with pytest.raises(ResultsError, match=r"2 problems.*epochs.0.patch_metrics.f1.MALADE: Field required"):
        validate_results(bad)
    write_results(tmp_path / "r.json", bad)  # no schema check while writing (the hot path) ...
    with pytest.raises(ResultsError, match="2 problems"):
        load_results(tmp_path / "r.json", validate=True)  # ... but on request when reading
    with pytest.raises(ResultsError, match="no results file"):
        load_results(tmp_path / "missing.json")
    epoch = RESULTS_SCHEMA["$defs"]["Epoch"]
    assert {"epoch", "train_loss", "val_loss", "lr", "throughput", "patch_metrics", "volume_metrics",
            "samples", "volumes"} <= set(epoch["required"])
    assert set(RESULTS_SCHEMA["$defs"]["Metrics"]["required"]) == {
        "accuracy", "precision", "recall", "f1", "roc_auc", "confusion_matrix"}
    assert {"balanced_accuracy", "pr_auc"} <= set(RESULTS_SCHEMA["$defs"]["Metrics"]["properties"])


def test_appending_an_epoch_writes_that_epoch_only_and_stays_valid_json(tmp_path):
    """The file is one JSON document after every epoch; an append writes about one epoch's bytes."""
    path = tmp_path / "training_results.json"
    full = results_with_epochs(4)
    writer = ResultsWriter(path, {**full, "epochs": [], "best_epoch": None, "stop_reason": None})
    sizes = [path.stat().st_size]
    for i, entry in enumerate(full["epochs"]):
        writer.append(entry, best_epoch=i, stop_reason="max_epochs" if i == 3 else None,
                      updated_at=full["updated_at"])
        back = json.loads(path.read_text())  # plain json.load reads it after every epoch
        assert [e["epoch"] for e in back["epochs"]] == list(range(i + 1)) and back["best_epoch"] == i
        assert back["epochs"][-1] == json.loads(json.dumps(entry))
        sizes.append(path.stat().st_size)
    growth = np.diff(sizes)
    line = [len(epoch_line(e)) for e in full["epochs"]]
    assert all(abs(g - n) <= 20 for g, n in zip(growth, line))  # the new line, its comma, a changed tail
    validate_results(load_results(path))


def test_a_kill_during_an_append_loses_that_epoch_only(tmp_path):
    path = tmp_path / "training_results.json"
    write_results(path, results_with_epochs(3))
    data = path.read_bytes()
    cut = data.rindex(b"\n,{") + 40  # killed while writing epoch 2's line: no tail, a partial line
    path.write_bytes(data[:cut])
    back = load_results(path)
    assert [e["epoch"] for e in back["epochs"]] == [0, 1]
    assert back["stop_reason"] is None and back["best_epoch"] is None  # a study sees an unfinished run
    assert load_results(path, upto_epoch=0)["epochs"][0] == json.loads(data.split(b"\n")[1])


def test_reading_only_the_best_epochs_samples(tmp_path):
    path = tmp_path / "training_results.json"
    res = results_with_epochs(3)
    res["best_epoch"] = 1
    write_results(path, res)
    light = load_results(path, samples="best")
    assert [("samples" in e) for e in light["epochs"]] == [False, True, False]
    assert light.best["samples"] == res["epochs"][1]["samples"]
    assert light["epochs"][2]["volume_metrics"] == res["epochs"][2]["volume_metrics"]
    assert all("samples" not in e for e in load_results(path, samples="none")["epochs"])


def test_strip_timing_leaves_only_what_must_repeat():
    a, b = results_with_epochs(2, wall=1.0), results_with_epochs(2, wall=7.0)
    b["started_at"] = "another time"
    assert a != b and strip_timing(a) == strip_timing(b)
    stripped = json.dumps(strip_timing(a))
    assert not any(f'"{k}"' in stripped for k in TIMING_KEYS)
    assert "throughput" in a["epochs"][0]  # the input is untouched
    b["epochs"][1]["val_loss"] += 1e-9
    assert strip_timing(a) != strip_timing(b)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_record_epoch_checks_the_stop_reason():
    with pytest.raises(ValueError, match="stop_reason"):
        record_epoch(results_with_epochs(0), {}, best_epoch=None, stop_reason="tired")
