"""Validation evaluator: collect patch logits, aggregate them per stack, compute metrics with sklearn.

    ev = Evaluator(loader.stack_ids, aggregate="mean")
    for batch in loader.epoch(e):
        ev.add(batch.stack_index, batch.position, model(batch.images), batch.labels)
    result = ev.finalize()          # EvalResult: patch_metrics, volume_metrics, samples, volumes, val_loss

Per-patch probability = sigmoid(logit); per-stack probability = mean (or max, or mean of the top k)
of its patch probabilities; a label is predicted MALADE (1) when its probability is >= 0.5 (the
seed's rule), or, with `threshold="tuned"` (train.threshold), >= the threshold that maximises the
stack F1 of MALADE over this evaluation's stacks (`tune_threshold`); the patch level keeps 0.5.
`add` keeps tensors where they are (no host sync per batch); everything moves to the CPU in finalize.
Under DDP, gather `arrays()` from every rank and `add` them into one evaluator on rank 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.special import expit
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from stacktrain.choices import Aggregate, options
from stacktrain.errors import EvalError
from stacktrain.stores.layout import CLASS_NAMES

THRESHOLD = 0.5
AGGREGATES = options(Aggregate)


def binary_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float = THRESHOLD) -> dict[str, Any]:
    """At `threshold`: accuracy, balanced accuracy; precision, recall, F1 per class (SAIN, MALADE); the threshold-free
    ROC-AUC and PR-AUC (average precision of MALADE); confusion matrix [0, 1].

    A class never predicted (or never present) scores 0 rather than raising (zero_division=0);
    ROC-AUC and PR-AUC are None when the labels hold a single class.
    """
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    pred = (p >= threshold).astype(np.int64)
    precision, recall, f1, _ = precision_recall_fscore_support(y, pred, labels=[0, 1], zero_division=0)
    both = len(np.unique(y)) == 2
    per_class = lambda v: {name: float(v[i]) for i, name in enumerate(CLASS_NAMES)}  # noqa: E731
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if both else float(accuracy_score(y, pred)),
        "precision": per_class(precision),
        "recall": per_class(recall),
        "f1": per_class(f1),
        "roc_auc": float(roc_auc_score(y, p)) if both else None,
        "pr_auc": float(average_precision_score(y, p)) if both else None,
        "confusion_matrix": confusion_matrix(y, pred, labels=[0, 1]).tolist(),
    }


def tune_threshold(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The threshold that maximises F1 of MALADE over these items without predicting one class for all:
    a midpoint between two neighbouring distinct probabilities (so no item sits on it); ties go to the
    higher balanced accuracy, then to the threshold nearest 0.5. 0.5 when no threshold separates
    anything (one class present, or all probabilities equal)."""
    y = np.asarray(labels, dtype=bool)
    p = np.asarray(probabilities, dtype=np.float64)
    distinct = np.unique(p)
    if len(distinct) < 2 or y.all() or not y.any():
        return THRESHOLD
    cuts = (distinct[1:] + distinct[:-1]) / 2
    pred = p[None, :] >= cuts[:, None]  # (cuts, items)
    tp, fp = (pred & y).sum(1), (pred & ~y).sum(1)
    fn, tn = (~pred & y).sum(1), (~pred & ~y).sum(1)
    f1 = 2 * tp / (2 * tp + fp + fn)
    balanced = (tp / (tp + fn) + tn / (tn + fp)) / 2
    best = np.lexsort((np.abs(cuts - THRESHOLD), -balanced, -f1))[0]  # the last key is the primary one
    return float(cuts[best])


def aggregate_probabilities(probabilities: np.ndarray, how: str = "mean", topk: int = 3) -> float:
    """One stack's probability from its patch probabilities."""
    p = np.asarray(probabilities, dtype=np.float64)
    if how == "mean":
        return float(p.mean())
    if how == "max":
        return float(p.max())
    if how == "topk":
        return float(np.sort(p)[::-1][:topk].mean())
    raise ValueError(f"aggregate {how!r}; choose one of {', '.join(AGGREGATES)}")


def degenerate(metrics: dict[str, Any]) -> bool:
    """True when every item was predicted as one class (a column of the confusion matrix is empty)."""
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    return tn + fn == 0 or tp + fp == 0


def selection_score(metrics: dict[str, Any]) -> float:
    """Validation F1 of MALADE, except 0 when every item was predicted as one class.

    A model that calls everything MALADE scores F1 = 2p / (1 + p) at prevalence p (0.667 at 50 %),
    more than many honest models; it carries no information, so it scores 0 and never wins.
    """
    return 0.0 if degenerate(metrics) else float(metrics["f1"]["MALADE"])


def selection_key(metrics: dict[str, Any], stack_metrics: dict[str, Any], val_loss: float) -> tuple[float, ...]:
    """(selection score, stack ROC-AUC, -validation loss): compared in that order, so that the frequent
    ties of F1 over a few stacks break deterministically on the threshold-free AUC, then on the loss."""
    auc = stack_metrics.get("roc_auc")
    return (selection_score(metrics), -1.0 if auc is None else float(auc), -float(val_loss))


@dataclasses.dataclass(frozen=True)
class EvalResult:
    val_loss: float | None
    """Mean BCE-with-logits over validation patches (with the training pos_weight, if any); this and the
    metrics are over labelled stacks only, None when none is (prediction on unlabeled stacks)."""
    patch_metrics: dict[str, Any] | None
    volume_metrics: dict[str, Any] | None
    samples: list[dict[str, Any]]
    """{stack_id, position: [z, y, x], probability, label[, padded_fraction]}, sorted by stack then position."""
    volumes: list[dict[str, Any]]
    """{stack_id, aggregated_probability, predicted_label, label, n_patches}, in stack order."""
    threshold: float = THRESHOLD
    """The stack threshold of predicted_label and volume_metrics (0.5, or tuned on these stacks)."""
    fixed_volume_metrics: dict[str, Any] | None = None
    """With a tuned threshold: the stack metrics at 0.5 beside it, for comparison; else None."""

    def score(self, level: str) -> float:
        """The selection score at `level` ("patch" or "stack"): see `selection_score`."""
        return selection_score(self.patch_metrics if level == "patch" else self.volume_metrics)

    def selection_key(self, level: str) -> tuple[float, float, float]:
        """What early stopping and studies rank epochs on: see `selection_key`."""
        return selection_key(self.patch_metrics if level == "patch" else self.volume_metrics,
                             self.volume_metrics, self.val_loss)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _numpy(x: Any, dtype) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly bf16 on a GPU
        import torch
        if x.is_floating_point():
            x = x.to(torch.float32)
        x = x.cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _keep(x: Any) -> Any:
    """A tensor without its autograd graph (no copy, no sync), or a copy of anything else."""
    return x.detach() if hasattr(x, "detach") else np.array(x)


def _concat(parts: Sequence[Any], dtype, shape: tuple[int, ...]) -> np.ndarray:
    if not parts:
        return np.zeros((0, *shape[1:]), dtype)
    return np.concatenate([_numpy(x, dtype).reshape(shape) for x in parts])


class Evaluator:
    """Aggregator of one validation pass; `add` per batch, `finalize` once."""

    def __init__(self, stack_ids: Sequence[str], *, aggregate: str = "mean", topk: int = 3,
                 pos_weight: float | None = None, threshold: float | str = THRESHOLD,
                 padded: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None):
        """`padded(stack_index, positions)`: each patch's share of padding (PatchIndex.padded_fraction),
        written as `padded_fraction` into the sample of every partly padded patch; None: never written."""
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}")
        if threshold != "tuned" and not (isinstance(threshold, float) and 0 < threshold < 1):
            raise ValueError(f"threshold {threshold!r}; give a number in (0, 1) or 'tuned'")
        self.stack_ids = list(stack_ids)
        self.aggregate, self.topk, self.pos_weight, self.padded = aggregate, topk, pos_weight, padded
        self.threshold = threshold
        self._parts: list[tuple[Any, Any, Any, Any]] = []

    def add(self, stack_index, positions, logits, labels) -> None:
        """One batch: stack_index (N,), positions (N, 3), logits (N,) or (N, 1), labels (N,)."""
        self._parts.append(tuple(_keep(x) for x in (stack_index, positions, logits, labels)))

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything added so far as CPU numpy arrays (what DDP ranks gather)."""
        cols = list(zip(*self._parts)) or [[], [], [], []]
        return {"stack_index": _concat(cols[0], np.int64, (-1,)),
                "position": _concat(cols[1], np.int64, (-1, 3)),
                "logit": _concat(cols[2], np.float32, (-1,)),
                "label": _concat(cols[3], np.float32, (-1,))}

    def finalize(self) -> EvalResult:
        a = self.arrays()
        n = len(a["logit"])
        if not (len(a["stack_index"]) == len(a["position"]) == n == len(a["label"])):
            raise EvalError(f"evaluator got {len(a['stack_index'])} stack indices, {len(a['position'])} "
                            f"positions, {n} logits and {len(a['label'])} labels; they must match")
        if n == 0:
            raise EvalError("no validation patches: the validation part is empty (or every patch was "
                            "filtered out); check data.val_part in the split file and patch.foreground_min")
        bad = (a["stack_index"] < 0) | (a["stack_index"] >= len(self.stack_ids))
        if bad.any():
            raise EvalError(f"stack_index {int(a['stack_index'][bad][0])} is outside the evaluator's "
                            f"{len(self.stack_ids)} stacks; build it with the loader's stack_ids")
        labels = a["label"].astype(np.int64)
        # Canonical order (stack, z, y, x): results do not depend on batch order, rank count or resume.
        order = np.lexsort((a["position"][:, 2], a["position"][:, 1], a["position"][:, 0], a["stack_index"]))
        sidx, pos, logit = a["stack_index"][order], a["position"][order], a["logit"][order]
        labels = labels[order]
        key = np.column_stack([sidx, pos])
        dup = np.flatnonzero((key[1:] == key[:-1]).all(axis=1))
        if dup.size:
            i = dup[0]
            raise EvalError(f"patch {self.stack_ids[sidx[i]]!r} at {pos[i].tolist()} was added "
                            f"{int((key == key[i]).all(axis=1).sum())} times ({dup.size} duplicates in all); "
                            "each patch must be counted once (drop DDP padding before evaluating)")
        prob = expit(logit.astype(np.float64))
        samples = [{"stack_id": self.stack_ids[s], "position": p.tolist(), "probability": float(q),
                    "label": _label(y)} for s, p, q, y in zip(sidx, pos, prob, labels)]
        if self.padded is not None:  # partly padded patches are evaluated, and say so (only they: file size)
            for sample, f in zip(samples, self.padded(sidx, pos)):
                if f > 0:
                    sample["padded_fraction"] = float(f)
        starts = np.flatnonzero(np.r_[True, sidx[1:] != sidx[:-1]])
        spans = list(zip(starts, [*starts[1:], n]))
        for lo, hi in spans:
            if len(set(labels[lo:hi].tolist())) != 1:
                raise EvalError(f"stack {self.stack_ids[sidx[lo]]!r} has patches labelled both 0 and 1; "
                                "labels are per stack")
        stack_labels = np.array([labels[lo] for lo, _ in spans], np.int64)
        stack_probs = np.array([aggregate_probabilities(prob[lo:hi], self.aggregate, self.topk) for lo, hi in spans])
        # Unlabeled stacks (label -1: predict on a store converted with --allow-unlabeled) are predicted
        # and decided, and left out of the loss and metrics (None when no stack has a label).
        known, stack_known = labels >= 0, stack_labels >= 0
        tuned = self.threshold == "tuned"
        threshold = tune_threshold(stack_labels[stack_known], stack_probs[stack_known]) if tuned else self.threshold
        volumes = [{"stack_id": self.stack_ids[sidx[lo]], "aggregated_probability": float(q),
                    "predicted_label": int(q >= threshold), "label": _label(y), "n_patches": int(hi - lo)}
                   for (lo, hi), q, y in zip(spans, stack_probs, stack_labels)]
        labelled = known.any()
        stack_metrics = (lambda t: binary_metrics(stack_labels[stack_known], stack_probs[stack_known], t)  # noqa: E731
                         if labelled else None)
        return EvalResult(
            val_loss=_bce_with_logits(logit[known].astype(np.float64), labels[known], self.pos_weight)
            if labelled else None,
            patch_metrics=binary_metrics(labels[known], prob[known]) if labelled else None,
            volume_metrics=stack_metrics(threshold), samples=samples, volumes=volumes, threshold=threshold,
            fixed_volume_metrics=stack_metrics(THRESHOLD) if tuned else None)


def _label(y: int) -> int | None:
    """A stored label (0, 1) as it is, an unlabeled stack's (-1) as None."""
    return int(y) if y >= 0 else None


def check_coverage(index: Any, where: str = "validation") -> None:
    """Refuse, before any training, a patch index (PatchIndex) that leaves a stack without a patch:
    the foreground filter must never remove a validation stack from the evaluation."""
    counts = np.bincount(np.asarray(index.stack), minlength=len(index.stack_ids))
    empty = [sid for sid, n in zip(index.stack_ids, counts) if n == 0]
    if empty:
        raise EvalError(f"patch.foreground_min leaves {where} stack(s) {', '.join(map(repr, empty[:5]))} "
                        f"({len(empty)} in all) without a patch; lower patch.foreground_min (0 keeps every "
                        "patch), or leave those stacks out of the split")


def _bce_with_logits(logit: np.ndarray, label: np.ndarray, pos_weight: float | None) -> float:
    """Mean of torch's BCEWithLogitsLoss, in float64: -(w*y*log s(x) + (1-y)*log(1-s(x)))."""
    import torch
    x, y = torch.from_numpy(logit), torch.from_numpy(label.astype(np.float64))
    w = None if pos_weight is None else torch.tensor(pos_weight, dtype=torch.float64)
    return float(torch.nn.functional.binary_cross_entropy_with_logits(x, y, pos_weight=w))
