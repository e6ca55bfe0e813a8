"""Bootstrap confidence intervals over patients, and paired differences between variants, on CV folds.

The statistic is what the report's point estimate is: a metric (F1 of MALADE or SAIN, accuracy,
ROC-AUC) computed on each run's validation predictions at the best epoch, averaged over runs (folds,
and seeds where a study repeats runs per seed). The independent unit is the patient (the split's
group): one bootstrap resample redraws, in every fold, the validation *patients* with replacement
within each class (a patient's class is MALADE when any of its stacks is; the split is stratified,
so every resample keeps both classes), and every stack follows its patient: a patient drawn twice
counts all its stacks twice, and at the patch level all their patches (a cluster bootstrap: stacks
of one patient, and patches of one stack, are not independent). The CI is the 2.5-97.5 % percentile
interval. Without groups, each stack is its own patient.

Resamples are drawn from one seeded generator, fold by fold in the order given (runs of the same
fold, e.g. other seeds, reuse that fold's resamples), class 0 then class 1, as
`rng.integers(0, n_patients_of_class, (n_resamples, n_patients_of_class))`. Two variants validated
on the same stacks therefore get the same resampled patients, so a paired difference is the
difference of their samples.
Metrics on a resample are computed from weighted confusion counts and a weighted ROC-AUC, which
equal scikit-learn's with `sample_weight` (tests/test_bootstrap.py checks it).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
from scipy import sparse

from stacktrain.choices import Level, options
from stacktrain.train.evaluator import THRESHOLD

LEVELS = options(Level)
METRICS = ("f1_malade", "f1_sain", "accuracy", "roc_auc")
METRIC_NAMES = {"f1_malade": "F1 MALADE", "f1_sain": "F1 SAIN", "accuracy": "accuracy", "roc_auc": "ROC-AUC"}
_BLOCK_CELLS = 4_000_000  # resamples x items per block: bounds memory at the patch level


@dataclasses.dataclass(frozen=True)
class FoldPredictions:
    """One fold's validation predictions at one epoch, stacks sorted by id."""
    fold: int
    stack_ids: tuple[str, ...]
    stack_label: np.ndarray
    stack_prob: np.ndarray
    patch_stack: np.ndarray
    """Index into stack_ids of every patch."""
    patch_label: np.ndarray
    patch_prob: np.ndarray
    stack_group: np.ndarray | None = None
    """Patient (group) number of every stack; None: every stack is its own patient."""
    stack_threshold: float = THRESHOLD
    """The epoch's stack threshold (0.5, or tuned with train.threshold = "tuned"); patches keep 0.5."""

    def groups(self) -> np.ndarray:
        return np.arange(len(self.stack_ids)) if self.stack_group is None else self.stack_group

    def patients_per_class(self) -> tuple[int, int]:
        cls = patient_classes(self.stack_label, self.groups())[1]
        return int((cls == 0).sum()), int((cls == 1).sum())


def fold_predictions(entry: dict[str, Any], fold: int, groups: dict[str, str] | None = None) -> FoldPredictions:
    """From one `epochs` entry of training_results.json (its `volumes` and `samples`); `groups` maps a
    stack id to its patient (the store's `group`)."""
    volumes = sorted(entry["volumes"], key=lambda v: v["stack_id"])
    ids = tuple(v["stack_id"] for v in volumes)
    where = {sid: i for i, sid in enumerate(ids)}
    samples = entry["samples"]
    names = sorted({groups[s] for s in ids}) if groups else []
    return FoldPredictions(
        fold=fold, stack_ids=ids,
        stack_group=np.array([names.index(groups[s]) for s in ids], np.int64) if groups else None,
        stack_label=np.array([v["label"] for v in volumes], np.int64),
        stack_prob=np.array([v["aggregated_probability"] for v in volumes], np.float64),
        patch_stack=np.array([where[s["stack_id"]] for s in samples], np.int64),
        patch_label=np.array([s["label"] for s in samples], np.int64),
        patch_prob=np.array([s["probability"] for s in samples], np.float64),
        stack_threshold=float(entry.get("threshold", THRESHOLD)))


def json_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The report's four numbers from a results `patch_metrics` / `volume_metrics` (None -> NaN)."""
    auc = metrics["roc_auc"]
    return {"f1_malade": metrics["f1"]["MALADE"], "f1_sain": metrics["f1"]["SAIN"],
            "accuracy": metrics["accuracy"], "roc_auc": float("nan") if auc is None else auc}


# -- resampling ------------------------------------------------------------------------------------
def patient_classes(labels: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(patient number of every stack, 0..P-1 in first-seen order; class of every patient)."""
    _, first, patient = np.unique(groups, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # renumber patients in the order their first stack appears
    patient = order[patient]
    cls = np.zeros(len(first), np.int64)
    np.maximum.at(cls, patient, np.asarray(labels, np.int64))
    return patient, cls


def resample_counts(labels: np.ndarray, n_resamples: int, rng: np.random.Generator,
                    groups: np.ndarray | None = None) -> np.ndarray:
    """(n_resamples, n stacks): times each stack is drawn, resampling patients with replacement within
    each class; every stack of a drawn patient is drawn with it."""
    n = len(labels)
    patient, cls = patient_classes(labels, np.arange(n) if groups is None else groups)
    by_patient = np.zeros((n_resamples, len(cls)), np.float64)
    rows = np.arange(n_resamples)[:, None]
    for c in (0, 1):
        members = np.flatnonzero(cls == c)
        if len(members) == 0:
            continue
        draws = rng.integers(0, len(members), (n_resamples, len(members)))
        np.add.at(by_patient, (rows, members[draws]), 1.0)
    return by_patient[:, patient]


def fold_counts(folds: list[FoldPredictions], n_resamples: int, seed: int) -> list[np.ndarray]:
    """One resample matrix per fold number; runs of the same fold (other seeds) share it."""
    rng = np.random.default_rng(seed)
    made: dict[int, np.ndarray] = {}
    for f in folds:
        if f.fold not in made:
            made[f.fold] = resample_counts(f.stack_label, n_resamples, rng, f.stack_group)
    return [made[f.fold] for f in folds]


# -- weighted metrics ------------------------------------------------------------------------------
def _safe_div(num: np.ndarray, den: np.ndarray, zero: float) -> np.ndarray:
    out = np.full(np.shape(num), zero, np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def weighted_metrics(weights: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                     threshold: float = THRESHOLD) -> dict[str, np.ndarray]:
    """Each metric for every row of `weights` (rows x items), predicting MALADE from `threshold`; F1 of
    an absent class is 0, as sklearn's zero_division=0; ROC-AUC is NaN when a row weighs one class only."""
    w = np.atleast_2d(np.asarray(weights, np.float64))
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(probs) >= threshold
    tp, fp = w @ (y & pred), w @ (~y & pred)
    fn, tn = w @ (y & ~pred), w @ (~y & ~pred)
    out = {"f1_malade": _safe_div(2 * tp, 2 * tp + fp + fn, 0.0),
           "f1_sain": _safe_div(2 * tn, 2 * tn + fn + fp, 0.0),
           "accuracy": _safe_div(tp + tn, tp + tn + fp + fn, np.nan)}
    # ROC-AUC = P(score of a positive > score of a negative), ties counting one half, weighted.
    scores, inverse = np.unique(np.asarray(probs, np.float64), return_inverse=True)
    onehot = lambda mask: sparse.csr_matrix(  # noqa: E731  items -> their distinct score
        (np.ones(mask.sum()), (np.flatnonzero(mask), inverse[mask])), shape=(len(y), len(scores)))
    pos, neg = np.asarray(w @ onehot(y)), np.asarray(w @ onehot(~y))
    below = np.cumsum(neg, axis=1) - neg
    out["roc_auc"] = _safe_div((pos * (below + 0.5 * neg)).sum(1), pos.sum(1) * neg.sum(1), np.nan)
    return out


def level_metrics(fold: FoldPredictions, counts: np.ndarray, level: str) -> dict[str, np.ndarray]:
    """Metrics of one fold at `level` for every resample (rows of stack `counts`)."""
    if level == "stack":
        return weighted_metrics(counts, fold.stack_label, fold.stack_prob, fold.stack_threshold)
    block = max(1, _BLOCK_CELLS // max(1, len(fold.patch_prob)))
    parts = [weighted_metrics(counts[i:i + block][:, fold.patch_stack], fold.patch_label, fold.patch_prob)
             for i in range(0, len(counts), block)]
    return {m: np.concatenate([p[m] for p in parts]) for m in METRICS}


def fold_mean_samples(folds: list[FoldPredictions], counts: list[np.ndarray], level: str) -> dict[str, np.ndarray]:
    """The statistic on every resample: each metric averaged over folds (NaN folds left out)."""
    per_fold = [level_metrics(f, c, level) for f, c in zip(folds, counts)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: ROC-AUC of one-class folds
        return {m: np.nanmean(np.stack([p[m] for p in per_fold]), axis=0) for m in METRICS}


def bootstrap(folds: list[FoldPredictions], level: str, *, n_resamples: int = 2000,
              seed: int = 0) -> dict[str, np.ndarray]:
    """Bootstrap samples (n_resamples,) of every metric's mean over folds."""
    return fold_mean_samples(folds, fold_counts(folds, n_resamples, seed), level)


def percentile_ci(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    samples = np.asarray(samples, np.float64)
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def check_paired(a: list[FoldPredictions], b: list[FoldPredictions], names: tuple[str, str]) -> None:
    """Paired resampling needs the same validation stacks (and labels) in each fold of both."""
    for fa, fb in zip(a, b):
        if fa.fold != fb.fold or fa.stack_ids != fb.stack_ids or not np.array_equal(fa.stack_label,
                                                                                   fb.stack_label):
            raise ValueError(f"{names[0]} and {names[1]} validated different stacks in fold {fa.fold}; "
                             "paired differences need runs made with the same split file")


def paired_bootstrap(a: list[FoldPredictions], b: list[FoldPredictions], level: str, *,
                     n_resamples: int = 2000, seed: int = 0,
                     names: tuple[str, str] = ("a", "b")) -> dict[str, np.ndarray]:
    """Samples of (metric of a) - (metric of b), both on the same resampled stacks of the same folds."""
    check_paired(a, b, names)
    counts = fold_counts(a, n_resamples, seed)
    sa, sb = fold_mean_samples(a, counts, level), fold_mean_samples(b, counts, level)
    return {m: sa[m] - sb[m] for m in METRICS}
