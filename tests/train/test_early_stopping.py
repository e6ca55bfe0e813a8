"""Early stopping: patience, min_delta, best-epoch selection, resume state."""

from __future__ import annotations

import math

import pytest

from stacktrain.train.early_stopping import EarlyStopping


def run(stopper, scores):
    """Feed scores until the stopper says stop; return (improved flags, epoch it stopped after)."""
    flags = []
    for epoch, s in enumerate(scores):
        flags.append(stopper.step(s, epoch))
        if stopper.should_stop:
            return flags, epoch
    return flags, None


def test_patience_counts_epochs_without_improvement():
    flags, stopped = run(EarlyStopping(patience=2), [0.5, 0.6, 0.6, 0.55, 0.9])
    assert flags == [True, True, False, False] and stopped == 3  # 0.9 at epoch 4 is never seen
    flags, stopped = run(EarlyStopping(patience=2), [0.5, 0.6, 0.6, 0.7, 0.7, 0.7])
    assert flags == [True, True, False, True, False, False] and stopped == 5  # an improvement resets it


def test_min_delta_is_the_smallest_improvement():
    s = EarlyStopping(patience=20, min_delta=1e-5)
    assert s.step(0.5) and not s.step(0.5 + 5e-6) and s.step(0.5 + 2e-5)
    assert s.best_score == pytest.approx(0.50002) and s.best_epoch == 2
    zero = EarlyStopping(patience=3, min_delta=0.0)
    assert zero.step(0.5) and not zero.step(0.5) and zero.step(0.5000001)


def test_best_selection_and_nan():
    s = EarlyStopping(patience=20)
    for epoch, score in enumerate([0.2, 0.8, 0.7, 0.9, 0.85, math.nan, 0.9]):
        s.step(score, epoch)
    assert (s.best_epoch, s.best_score, s.bad_epochs) == (3, 0.9, 3)
    assert not s.should_stop
    low = EarlyStopping(patience=2, mode="min")
    assert low.step(1.0) and low.step(0.5) and not low.step(0.6) and not low.step(math.nan)
    assert low.should_stop and low.best_epoch == 1


def test_state_round_trip_continues_identically():
    scores = [0.3, 0.5, 0.4, 0.45, 0.6, 0.2, 0.1, 0.3, 0.9]
    straight = EarlyStopping(patience=3)
    run(straight, scores)
    first = EarlyStopping(patience=3)
    run(first, scores[:3])
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(first.state_dict())
    for epoch, score in enumerate(scores[3:], start=3):
        resumed.step(score, epoch)
        if resumed.should_stop:
            break
    assert resumed.state_dict() == straight.state_dict()
    assert straight.best_epoch == 4 and straight.should_stop and straight.last_epoch == 7


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="best")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)


def test_ties_break_on_the_next_scores_in_order_and_reset_patience():
    """Keys (F1, AUC, -loss): an equal F1 with a higher AUC, or equal F1 and AUC with a lower loss, is a
    new best; a lower F1 never is, whatever its AUC."""
    stopper = EarlyStopping(patience=2, min_delta=1e-5)
    keys = [(0.5, 0.7, -0.6), (0.5, 0.8, -0.9), (0.5, 0.8, -0.5), (0.4, 1.0, -0.1), (0.5, 0.8, -0.5),
            (0.5, 0.8, -0.7)]
    flags, stopped = run(stopper, keys)
    assert flags == [True, True, True, False, False] and stopped == 4 and stopper.best_epoch == 2
    state = stopper.state_dict()
    again = EarlyStopping(patience=2, min_delta=1e-5)
    again.load_state_dict(state)
    assert again.best_score == (0.5, 0.8, -0.5) and not again.is_improvement((0.5, 0.8, -0.5))
