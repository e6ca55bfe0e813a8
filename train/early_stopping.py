"""Early stopping and best-epoch selection on one score, or on a key of scores compared in order.

    stopper = EarlyStopping(patience=20, min_delta=1e-5)
    for epoch in ...:
        if stopper.step(evaluation.selection_key("stack"), epoch):   # True: a new best -> save best.pt
            ...
        if stopper.should_stop:
            break

The training loop passes the selection key (evaluator.selection_key): (stack F1 of MALADE, 0 for a
one-class prediction; stack ROC-AUC; -validation loss). An epoch improves when its first score beats
the best by more than `min_delta` (mode "max"; "min" for losses), or when it equals the best one
exactly and the remaining scores are greater, compared in order: a deterministic tie-break, and the
same quantity for early stopping and best.pt. A NaN first score never improves. `should_stop` turns
True after `patience` epochs in a row without an improvement. The state round-trips through
`state_dict` for resume.
"""

from __future__ import annotations

import math
from typing import Any

MODES = ("max", "min")


class EarlyStopping:
    def __init__(self, patience: int = 20, min_delta: float = 1e-5, mode: str = "max"):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; choose max or min")
        if patience < 1 or min_delta < 0:
            raise ValueError(f"patience {patience} must be >= 1 and min_delta {min_delta} >= 0")
        self.patience, self.min_delta, self.mode = patience, min_delta, mode
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.last_epoch: int | None = None

    def is_improvement(self, score: float | tuple[float, ...]) -> bool:
        key = _key(score)
        if math.isnan(key[0]):
            return False
        if self.best_score is None:
            return True
        best, sign = _key(self.best_score), 1.0 if self.mode == "max" else -1.0
        if sign * (key[0] - best[0]) > self.min_delta:
            return True
        if key[0] != best[0]:
            return False
        rest = [sign * v for v in key[1:] if not math.isnan(v)], [sign * v for v in best[1:] if not math.isnan(v)]
        return len(rest[0]) == len(rest[1]) and rest[0] > rest[1]  # ties of the first score: the others in order

    def step(self, score: float | tuple[float, ...], epoch: int | None = None) -> bool:
        """Record one epoch's score (or key); return True when it is the new best."""
        epoch = (self.last_epoch + 1 if self.last_epoch is not None else 0) if epoch is None else epoch
        self.last_epoch = epoch
        score = _key(score) if isinstance(score, (tuple, list)) else float(score)
        if self.is_improvement(score):
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"patience": self.patience, "min_delta": self.min_delta, "mode": self.mode,
                "best_score": self.best_score, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters; patience/min_delta/mode stay as configured now (a resume may change them)."""
        best = state["best_score"]
        self.best_score = _key(best) if isinstance(best, (tuple, list)) else best
        self.best_epoch = state["best_epoch"]
        self.bad_epochs, self.last_epoch = state["bad_epochs"], state["last_epoch"]


def _key(score: float | tuple[float, ...] | list[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in score) if isinstance(score, (tuple, list)) else (float(score),)
