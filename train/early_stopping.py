"""Early stopping and best-epoch selection on one score (validation F1 of MALADE by default).

    stopper = EarlyStopping(patience=20, min_delta=1e-5)
    for epoch in ...:
        if stopper.step(score, epoch):   # True: a new best -> save best.pt
            ...
        if stopper.should_stop:
            break

An epoch improves when its score beats the best by more than `min_delta` (mode "max"; "min" for
losses). A NaN score never improves. `should_stop` turns True after `patience` epochs in a row
without an improvement. The state round-trips through `state_dict` for resume.
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

    def is_improvement(self, score: float) -> bool:
        if math.isnan(score):
            return False
        if self.best_score is None:
            return True
        if self.mode == "max":
            return score > self.best_score + self.min_delta
        return score < self.best_score - self.min_delta

    def step(self, score: float, epoch: int | None = None) -> bool:
        """Record one epoch's score; return True when it is the new best."""
        epoch = (self.last_epoch + 1 if self.last_epoch is not None else 0) if epoch is None else epoch
        self.last_epoch = epoch
        score = float(score)
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
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.bad_epochs, self.last_epoch = state["bad_epochs"], state["last_epoch"]
