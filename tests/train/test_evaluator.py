"""The evaluator: hand-computed aggregation and metrics, agreement with scikit-learn, refusals."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score, roc_auc_score

from stacktrain.train.evaluator import EvalError, Evaluator, aggregate_probabilities, binary_metrics

L3, L9 = math.log(3), math.log(9)  # sigmoid(ln 3) = 0.75, sigmoid(ln 9) = 0.9


def _two_stacks(aggregate="mean", topk=3):
    """Stack A (MALADE): p = 0.75, 0.25, 0.9; stack B (SAIN): p = 0.1, 0.5; added out of order."""
    ev = Evaluator(["A", "B", "unused"], aggregate=aggregate, topk=topk)
    ev.add([1, 0], [[0, 0, 8], [0, 8, 0]], [-L9, -L3], [0, 1])
    ev.add(np.array([0, 0, 1]), np.array([[0, 0, 8], [0, 0, 0], [0, 0, 0]]), np.array([L9, L3, 0.0]),
           np.array([1, 1, 0]))
    return ev


def test_hand_computed_mean_aggregation_and_metrics():
    r = _two_stacks().finalize()
    assert [(s["stack_id"], s["position"], round(s["probability"], 6), s["label"]) for s in r.samples] == [
        ("A", [0, 0, 0], 0.75, 1), ("A", [0, 0, 8], 0.9, 1), ("A", [0, 8, 0], 0.25, 1),
        ("B", [0, 0, 0], 0.5, 0), ("B", [0, 0, 8], 0.1, 0)]
    a, b = r.volumes
    assert (a["stack_id"], a["n_patches"], a["label"], a["predicted_label"]) == ("A", 3, 1, 1)
    assert a["aggregated_probability"] == pytest.approx((0.75 + 0.9 + 0.25) / 3)
    assert (b["stack_id"], b["n_patches"], b["predicted_label"]) == ("B", 2, 0)
    assert b["aggregated_probability"] == pytest.approx(0.3)  # logits are kept as float32
    # patches: labels 1 1 1 0 0, predictions (p >= 0.5) 1 1 0 1 0
    pm = r.patch_metrics
    assert pm["accuracy"] == pytest.approx(3 / 5)
    assert pm["precision"] == pytest.approx({"SAIN": 1 / 2, "MALADE": 2 / 3})
    assert pm["recall"] == pytest.approx({"SAIN": 1 / 2, "MALADE": 2 / 3})
    assert pm["f1"] == pytest.approx({"SAIN": 1 / 2, "MALADE": 2 / 3})
    assert pm["roc_auc"] == pytest.approx(5 / 6)  # 5 of the 6 (MALADE, SAIN) pairs are ordered right
    assert pm["confusion_matrix"] == [[1, 1], [1, 2]]
    vm = r.volume_metrics
    assert vm["accuracy"] == 1.0 and vm["f1"] == {"SAIN": 1.0, "MALADE": 1.0} and vm["roc_auc"] == 1.0
    assert vm["confusion_matrix"] == [[1, 0], [0, 1]]
    want_loss = -(math.log(0.75) + math.log(0.9) + math.log(0.25) + math.log(0.5) + math.log(0.9)) / 5
    assert r.val_loss == pytest.approx(want_loss)
    assert r.score("patch") == pytest.approx(2 / 3) and r.score("stack") == 1.0


def test_max_and_topk_aggregation_and_the_inclusive_threshold():
    a, b = _two_stacks("max").finalize().volumes
    assert a["aggregated_probability"] == pytest.approx(0.9)
    assert b["aggregated_probability"] == pytest.approx(0.5) and b["predicted_label"] == 1  # 0.5 >= 0.5
    a, b = _two_stacks("topk", topk=2).finalize().volumes
    assert a["aggregated_probability"] == pytest.approx((0.9 + 0.75) / 2)
    assert b["aggregated_probability"] == pytest.approx((0.5 + 0.1) / 2)  # fewer than k: all of them
    assert aggregate_probabilities([0.2, 0.4], "topk", topk=5) == pytest.approx(0.3)


def test_pos_weight_enters_the_val_loss():
    ev = Evaluator(["A"], pos_weight=2.0)
    ev.add([0], [[0, 0, 0]], [L3], [1])
    assert ev.finalize().val_loss == pytest.approx(-2 * math.log(0.75))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    m = binary_metrics(y, p)
    pred = (p >= 0.5).astype(int)
    assert m["accuracy"] == accuracy_score(y, pred)
    for cls, name in ((0, "SAIN"), (1, "MALADE")):
        assert m["precision"][name] == precision_score(y, pred, pos_label=cls)
        assert m["recall"][name] == recall_score(y, pred, pos_label=cls)
        assert m["f1"][name] == f1_score(y, pred, pos_label=cls)
    assert m["roc_auc"] == roc_auc_score(y, p)
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()


def test_zero_division_and_one_class():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no UndefinedMetricWarning either
        m = binary_metrics(np.zeros(4, int), np.array([0.1, 0.2, 0.3, 0.4]))
    assert m["accuracy"] == 1.0 and m["roc_auc"] is None
    assert m["precision"]["MALADE"] == m["recall"]["MALADE"] == m["f1"]["MALADE"] == 0.0
    assert m["f1"]["SAIN"] == 1.0 and m["confusion_matrix"] == [[4, 0], [0, 0]]


def test_torch_tensors_of_any_float_dtype():
    ev = Evaluator(["A", "B"])
    ev.add(torch.tensor([0, 1]), torch.tensor([[0, 0, 0], [0, 0, 0]]),
           torch.tensor([[L3], [-L3]], dtype=torch.bfloat16), torch.tensor([1.0, 0.0]))
    r = ev.finalize()
    assert [v["predicted_label"] for v in r.volumes] == [1, 0]
    assert r.samples[0]["probability"] == pytest.approx(0.75, abs=1e-2)  # bf16 logit


def test_refusals():
    ev = Evaluator(["A", "B"])
    ev.add([1, 1], [[0, 8, 16], [0, 8, 16]], [0.0, 1.0], [0, 0])
    with pytest.raises(EvalError, match=r"patch 'B' at \[0, 8, 16\] was added 2 times"):
        ev.finalize()
    with pytest.raises(EvalError, match="no validation patches"):
        Evaluator(["A"]).finalize()
    mixed = Evaluator(["A"])
    mixed.add([0, 0], [[0, 0, 0], [8, 0, 0]], [0.0, 0.0], [0, 1])
    with pytest.raises(EvalError, match="stack 'A' has patches labelled both"):
        mixed.finalize()
    outside = Evaluator(["A"])
    outside.add([3], [[0, 0, 0]], [0.0], [0])
    with pytest.raises(EvalError, match="stack_index 3 is outside"):
        outside.finalize()
    with pytest.raises(ValueError, match="aggregate 'median'"):
        Evaluator(["A"], aggregate="median")


def _stack_eval(stack_probs, labels, patch_probs=None):
    """One patch per stack (or the given patch probabilities) -> an EvalResult."""
    ids = [f"s{i}" for i in range(len(labels))]
    ev = Evaluator(ids)
    for i, (p, y) in enumerate(zip(stack_probs, labels)):
        for j, q in enumerate(patch_probs[i] if patch_probs else [p]):
            ev.add([i], [[0, 0, 16 * j]], [math.log(q / (1 - q))], [y])
    return ev.finalize()


def test_a_constant_malade_model_never_wins_selection_at_stack_level():
    """Calling every stack MALADE scores F1 0.667 on balanced stacks, more than this honest model's 0.6;
    the selection key still ranks the honest model first, and the degenerate model scores 0."""
    from stacktrain.train.early_stopping import EarlyStopping
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    honest = _stack_eval([0.2, 0.6, 0.6, 0.4, 0.1, 0.7, 0.8, 0.4, 0.3, 0.9], labels)
    constant = _stack_eval([0.9] * 10, labels)
    assert constant.volume_metrics["f1"]["MALADE"] == pytest.approx(2 / 3)
    assert honest.volume_metrics["f1"]["MALADE"] == pytest.approx(0.6)
    assert constant.score("stack") == 0.0 and honest.score("stack") == pytest.approx(0.6)
    for order in ((constant, honest), (honest, constant)):
        stopper = EarlyStopping(patience=5, min_delta=1e-5)
        for epoch, ev in enumerate(order):
            stopper.step(ev.selection_key("stack"), epoch)
        assert order[stopper.best_epoch] is honest


def test_threshold_free_stack_metrics_are_sklearns():
    from sklearn.metrics import average_precision_score, balanced_accuracy_score
    labels = [0, 0, 0, 1, 1, 1, 1]
    probs = [0.2, 0.55, 0.4, 0.45, 0.8, 0.6, 0.51]
    m = _stack_eval(probs, labels).volume_metrics
    assert m["pr_auc"] == pytest.approx(average_precision_score(labels, probs))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, np.array(probs) >= 0.5))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(labels, probs))


def test_the_foreground_filter_may_not_remove_a_validation_stack(tmp_path):
    """A validation stack without a patch is refused before training, by name."""
    from stacktrain.pipelines.config import PatchConfig
    from stacktrain.pipelines.patches import build_index
    from stacktrain.stores.reader import Store
    from stacktrain.testing import tissue, write_array
    from stacktrain.train.evaluator import check_coverage
    store_path = tmp_path / "s.zarr"
    write_array(store_path, "full", tissue((3, 16, 32, 32), seed=0) | 1, label="SAIN", group="p0",
                chunk_zyx=(16, 32, 32), shard_zyx=(16, 32, 32))
    write_array(store_path, "empty", np.zeros((3, 16, 32, 32), np.uint8), label="MALADE", group="p1",
                chunk_zyx=(16, 32, 32), shard_zyx=(16, 32, 32))
    store = Store(store_path)
    index = build_index(store, ["full", "empty"], PatchConfig(size=(16, 32, 32), foreground_min=0.5))
    with pytest.raises(EvalError, match=r"validation stack\(s\) 'empty' \(1 in all\) without a patch"):
        check_coverage(index)
    check_coverage(build_index(store, ["full", "empty"], PatchConfig(size=(16, 32, 32))))  # no filter: fine
