"""train.threshold = "tuned": the threshold maximises validation stack F1 without a one-class call, goes
into best.pt, and `predict` applies it; "fixed" keeps the seed's 0.5."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.console import Console
from sklearn.metrics import f1_score

from stacktrain.errors import ConfigError
from stacktrain.train.checkpoint import BEST, load_checkpoint, stack_threshold
from stacktrain.train.evaluator import Evaluator, binary_metrics, degenerate, tune_threshold
from stacktrain.train.loop import train
from stacktrain.train.predict import predict
from stacktrain.train.results import load_results
from tests.support import tiny_config, tiny_data


def _best_non_degenerate_f1(labels, probs):
    """Brute force over every cut between distinct probabilities: the best F1 of MALADE that predicts both."""
    u = np.unique(probs)
    scores = [f1_score(labels, probs >= t, zero_division=0) for t in (u[1:] + u[:-1]) / 2]
    return max(scores)


@pytest.mark.parametrize("labels, probs, expected", [
    pytest.param([0, 0, 1, 1], [0.2, 0.3, 0.42, 0.46], 0.36, id="separable-below-0.5"),
    pytest.param([1, 0, 1, 1], [0.1, 0.2, 0.3, 0.4], 0.25, id="all-MALADE-would-score-more-but-is-refused"),
    pytest.param([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5], 0.5, id="all-equal-keeps-0.5"),
    pytest.param([1, 1, 1], [0.2, 0.6, 0.7], 0.5, id="one-class-keeps-0.5"),
])
def test_tuned_threshold_on_hand_made_cases(labels, probs, expected):
    t = tune_threshold(np.array(labels), np.array(probs))
    assert t == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(5))
def test_tuned_threshold_is_the_best_cut_that_predicts_both_classes(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 30)
    labels[:2] = [0, 1]
    probs = np.clip(0.35 + 0.1 * labels + rng.normal(0, 0.08, 30), 0.01, 0.99)
    t = tune_threshold(labels, probs)
    m = binary_metrics(labels, probs, t)
    assert not degenerate(m)
    assert m["f1"]["MALADE"] == pytest.approx(_best_non_degenerate_f1(labels, probs))
    at_half = binary_metrics(labels, probs)
    assert m["f1"]["MALADE"] >= at_half["f1"]["MALADE"] or degenerate(at_half)


def test_evaluator_tuned_decides_at_its_threshold_and_keeps_the_fixed_metrics():
    ev = Evaluator(["A", "B", "C", "D"], threshold="tuned")
    logit = np.log(np.array([0.2, 0.3, 0.42, 0.46]) / (1 - np.array([0.2, 0.3, 0.42, 0.46])))
    ev.add(np.arange(4), np.zeros((4, 3), np.int64), logit, np.array([0, 0, 1, 1]))
    r = ev.finalize()
    assert r.threshold == pytest.approx(0.36)
    assert [v["predicted_label"] for v in r.volumes] == [0, 0, 1, 1]
    assert r.volume_metrics["f1"]["MALADE"] == 1.0
    assert r.fixed_volume_metrics["f1"]["MALADE"] == 0.0  # at 0.5 every stack is SAIN
    fixed = Evaluator(["A", "B", "C", "D"])
    fixed.add(np.arange(4), np.zeros((4, 3), np.int64), logit, np.array([0, 0, 1, 1]))
    f = fixed.finalize()
    assert f.threshold == 0.5 and f.fixed_volume_metrics is None and f.volume_metrics == r.fixed_volume_metrics


def test_unknown_threshold_rule_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.threshold"):
        tiny_config(tmp_path / "s.zarr", tmp_path / "split.json", "train.threshold=0.4")


def test_tuned_run_stores_its_threshold_and_predict_applies_it(tmp_path):
    store, splits = tiny_data(tmp_path / "data")
    cfg = tiny_config(store, splits, "train.threshold=tuned", "train.epochs=2")
    results = load_results(train(cfg, run_dir=tmp_path / "run"))
    for e in results.epochs:
        assert "fixed_volume_metrics" in e and 0 < e["threshold"] < 1
        assert all(v["predicted_label"] == int(v["aggregated_probability"] >= e["threshold"]) for v in e["volumes"])
    best = results.best
    ckpt = load_checkpoint(tmp_path / "run" / BEST)
    assert stack_threshold(ckpt) == best["threshold"]
    report = predict(tmp_path / "run" / BEST, store, tmp_path / "pred", console=Console(quiet=True))
    saved = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert report["threshold"] == saved["threshold"] == best["threshold"]
    assert all(v["predicted_label"] == int(v["aggregated_probability"] >= best["threshold"]) for v in report["stacks"])
    val = {v["stack_id"]: v for v in best["volumes"]}  # the same model on the same stacks: the same decisions
    assert all(v["predicted_label"] == val[v["stack_id"]]["predicted_label"] for v in report["stacks"]
               if v["stack_id"] in val)


def test_steps_per_epoch_and_per_stack_sampling_set_the_run_budget(tmp_path):
    store, splits = tiny_data(tmp_path / "data")
    cfg = tiny_config(store, splits, "loader.steps_per_epoch=3", "loader.sampling=per-stack", "train.epochs=1")
    results = load_results(train(cfg, run_dir=tmp_path / "run"))
    assert [e["throughput"]["optimizer_steps"] for e in results.epochs] == [3]
    assert results["config"]["loader"]["sampling"] == "per-stack"
