"""Bootstrap CIs over stacks (train/stats.py) against direct computations with scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from stacktrain.train.study import stats
from stacktrain.train.study.stats import FoldPredictions


def sk_metrics(y, p, w=None, threshold=0.5) -> dict[str, float]:
    pred = (np.asarray(p) >= threshold).astype(int)
    return {"f1_malade": f1_score(y, pred, sample_weight=w, zero_division=0),
            "f1_sain": f1_score(y, pred, pos_label=0, sample_weight=w, zero_division=0),
            "accuracy": accuracy_score(y, pred, sample_weight=w),
            "roc_auc": roc_auc_score(y, p, sample_weight=w) if len(set(np.asarray(y)[np.asarray(
                w if w is not None else np.ones(len(y))) > 0])) == 2 else np.nan}


def make_fold(fold: int, n_stacks: int, patches: int, seed: int) -> FoldPredictions:
    rng = np.random.default_rng(seed)
    labels = np.arange(n_stacks) % 2
    patch_stack = np.repeat(np.arange(n_stacks), patches)
    patch_prob = np.clip(0.5 + (labels[patch_stack] - 0.5) * 0.3 + rng.normal(0, 0.25, len(patch_stack)), 0, 1)
    patch_prob = np.round(patch_prob, 2)  # ties, as real probabilities have after rounding
    stack_prob = np.array([patch_prob[patch_stack == s].mean() for s in range(n_stacks)])
    return FoldPredictions(fold=fold, stack_ids=tuple(f"f{fold}s{i:02d}" for i in range(n_stacks)),
                           stack_label=labels, stack_prob=stack_prob, patch_stack=patch_stack,
                           patch_label=labels[patch_stack], patch_prob=patch_prob)


def test_weighted_metrics_equal_sklearn_with_sample_weight():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p = np.round(rng.random(60), 1)  # many ties
    weights = rng.integers(0, 4, (20, 60)).astype(float)
    weights[0] = np.where(y == 1, 1.0, 0.0)  # one class only: ROC-AUC undefined, F1 SAIN 0
    got = stats.weighted_metrics(weights, y, p)
    for b, w in enumerate(weights):
        want = sk_metrics(y, p, w)
        for m in stats.METRICS:
            assert got[m][b] == pytest.approx(want[m], abs=1e-12, nan_ok=True), (m, b)
    assert np.isnan(got["roc_auc"][0]) and got["f1_sain"][0] == 0.0


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.65])
def test_stack_level_resamples_decide_at_the_epochs_threshold(threshold):
    """A tuned run's epoch records its threshold; the stack-level bootstrap decides with it."""
    entry = {"threshold": threshold,
             "volumes": [{"stack_id": f"s{i}", "aggregated_probability": p, "label": i % 2}
                         for i, p in enumerate([0.2, 0.35, 0.4, 0.6, 0.55, 0.7, 0.25, 0.45])],
             "samples": [{"stack_id": f"s{i}", "probability": 0.5, "label": i % 2} for i in range(8)]}
    fold = stats.fold_predictions(entry, 0)
    assert fold.stack_threshold == threshold
    identity = np.ones((1, 8))
    got = stats.level_metrics(fold, identity, "stack")
    want = sk_metrics(fold.stack_label, fold.stack_prob, threshold=threshold)
    for m in stats.METRICS:
        assert got[m][0] == pytest.approx(want[m], abs=1e-12), m


def direct_bootstrap(folds, level, n_resamples, seed):
    """The documented resampling, written out: per fold, per class, draw stacks; concatenate their
    rows (all patches of a drawn stack at the patch level); sklearn on the result; mean over folds."""
    rng = np.random.default_rng(seed)
    draws = []
    for f in folds:
        per_class = []
        for cls in (0, 1):
            members = np.flatnonzero(f.stack_label == cls)
            per_class.append(members[rng.integers(0, len(members), (n_resamples, len(members)))])
        draws.append(np.concatenate(per_class, axis=1))
    out = {m: np.empty(n_resamples) for m in stats.METRICS}
    for b in range(n_resamples):
        values = []
        for f, d in zip(folds, draws):
            if level == "stack":
                y, p = f.stack_label[d[b]], f.stack_prob[d[b]]
            else:
                rows = np.concatenate([np.flatnonzero(f.patch_stack == s) for s in d[b]])
                y, p = f.patch_label[rows], f.patch_prob[rows]
            values.append(sk_metrics(y, p))
        for m in stats.METRICS:
            out[m][b] = np.mean([v[m] for v in values])
    return out


@pytest.mark.parametrize("level", ["stack", "patch"])
def test_bootstrap_ci_of_a_known_case_matches_the_direct_computation(level):
    folds = [make_fold(0, 10, 5, seed=1), make_fold(1, 8, 4, seed=2)]
    got = stats.bootstrap(folds, level, n_resamples=50, seed=7)
    want = direct_bootstrap(folds, level, 50, seed=7)
    for m in stats.METRICS:
        np.testing.assert_allclose(got[m], want[m], atol=1e-12)
        lo, hi = stats.percentile_ci(got[m])
        assert (lo, hi) == pytest.approx(tuple(np.percentile(want[m], [2.5, 97.5])))
    point = stats.fold_mean_samples(folds, [np.ones((1, len(f.stack_ids))) for f in folds], level)
    for m in stats.METRICS:  # weights 1 give the plain metric: the report's point estimate
        key = "stack" if level == "stack" else "patch"
        plain = [sk_metrics(f.stack_label, f.stack_prob) if key == "stack" else sk_metrics(f.patch_label, f.patch_prob)
                 for f in folds]
        assert point[m][0] == pytest.approx(np.mean([v[m] for v in plain]))


def test_accuracy_ci_matches_the_normal_approximation():
    """Stratified by class, accuracy's variance is sum_c n_c p_c (1 - p_c) / n^2: a known answer."""
    n_per_class, p0, p1 = 400, 0.8, 0.6
    labels = np.repeat([0, 1], n_per_class)
    correct = np.r_[np.arange(n_per_class) < p0 * n_per_class, np.arange(n_per_class) < p1 * n_per_class]
    prob = np.where(correct, labels * 0.6 + 0.2, 0.8 - labels * 0.6)  # right side of 0.5 iff correct
    fold = FoldPredictions(fold=0, stack_ids=tuple(map(str, range(len(labels)))), stack_label=labels,
                           stack_prob=prob, patch_stack=np.arange(len(labels)), patch_label=labels,
                           patch_prob=prob)
    lo, hi = stats.percentile_ci(stats.bootstrap([fold], "stack", n_resamples=4000, seed=0)["accuracy"])
    acc = correct.mean()
    se = np.sqrt(n_per_class * (p0 * (1 - p0) + p1 * (1 - p1))) / len(labels)
    assert lo == pytest.approx(acc - 1.96 * se, abs=0.004)
    assert hi == pytest.approx(acc + 1.96 * se, abs=0.004)


def test_paired_differences_share_the_resamples():
    a = [make_fold(0, 12, 3, seed=1), make_fold(1, 12, 3, seed=2)]
    b = [make_fold(0, 12, 3, seed=3), make_fold(1, 12, 3, seed=4)]
    diff = stats.paired_bootstrap(a, b, "stack", n_resamples=200, seed=5)
    sa, sb = stats.bootstrap(a, "stack", n_resamples=200, seed=5), stats.bootstrap(b, "stack", n_resamples=200, seed=5)
    for m in stats.METRICS:
        np.testing.assert_allclose(diff[m], sa[m] - sb[m])
    assert all(np.all(v == 0) for v in stats.paired_bootstrap(a, a, "patch", n_resamples=50).values())
    other = [make_fold(0, 10, 3, seed=1), a[1]]
    with pytest.raises(ValueError, match="different stacks in fold 0"):
        stats.paired_bootstrap(a, other, "stack", n_resamples=10)


def test_percentile_ci_ignores_nan_and_reports_nan_when_empty():
    assert stats.percentile_ci(np.r_[np.arange(101.0), np.nan]) == pytest.approx((2.5, 97.5))
    assert all(np.isnan(stats.percentile_ci(np.array([np.nan, np.nan]))))


def test_the_resampling_unit_is_the_patient_within_its_class():
    """Stacks follow their patient: every stack of a patient is drawn as often as the patient, each
    class redraws as many patients as it has, and nothing else is drawn."""
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 0, 1])
    groups = np.array([0, 0, 0, 1, 2, 2, 3, 4, 5])  # p0: 3 SAIN stacks; p2: 2 MALADE stacks
    counts = stats.resample_counts(labels, 500, np.random.default_rng(0), groups)
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        assert (counts[:, members] == counts[:, members[:1]]).all()  # one patient, one count
    per_patient = np.stack([counts[:, np.flatnonzero(groups == g)[0]] for g in range(6)], axis=1)
    sain, malade = [0, 1, 4], [2, 3, 5]
    assert (per_patient[:, sain].sum(1) == 3).all() and (per_patient[:, malade].sum(1) == 3).all()
    assert counts[:, :3].std() > 0 and counts[:, 0].mean() == pytest.approx(1.0, abs=0.15)
    # the same generator draws, as the stack bootstrap does, but over patients: the direct computation
    rng = np.random.default_rng(0)
    draws = {c: np.array(m)[rng.integers(0, 3, (500, 3))] for c, m in ((0, sain), (1, malade))}
    want = np.zeros((500, 6))
    for c in (0, 1):
        np.add.at(want, (np.arange(500)[:, None], draws[c]), 1.0)
    np.testing.assert_array_equal(per_patient, want)


def test_correlated_stacks_of_a_patient_widen_the_interval():
    """Four patients per class, five near-identical stacks each: the patient bootstrap's accuracy CI is
    far wider than a stack bootstrap that treats the 20 stacks of a class as independent."""
    labels = np.repeat([0, 1], 20)
    groups = np.repeat(np.arange(8), 5)
    correct = np.isin(groups, [0, 1, 2, 4, 5, 6])  # one patient per class always wrong, with all its stacks
    prob = np.where(correct, 0.2 + 0.6 * labels, 0.8 - 0.6 * labels)
    base = dict(fold=0, stack_ids=tuple(map(str, range(40))), stack_label=labels, stack_prob=prob,
                patch_stack=np.arange(40), patch_label=labels, patch_prob=prob)
    by_patient = FoldPredictions(**base, stack_group=groups)
    by_stack = FoldPredictions(**base)
    assert by_patient.patients_per_class() == (4, 4) and by_stack.patients_per_class() == (20, 20)
    def width(fold):
        lo, hi = stats.percentile_ci(stats.bootstrap([fold], "stack", n_resamples=2000)["accuracy"])
        return hi - lo
    assert width(by_patient) > 1.8 * width(by_stack)
