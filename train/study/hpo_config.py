"""The `[hpo]` table of a study file, typed (the search itself is in hpo.py).

`load_study` builds `HpoConfig` with `stacktrain.config.build`, so a bad key or value is refused when the
file is read, as `FILE: KEY = VALUE: what is allowed`. What needs the base training config (does
`optim.lr` exist, does 16 fit `loader.batch_size`) is checked by `hpo.load_space`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from stacktrain.choices import Pruner, SpaceKind, options
from stacktrain.config import check_choices, require

_NUMERIC = ("low", "high", "log", "step")
KIND_KEYS: dict[str, tuple[str, ...]] = {"float": _NUMERIC, "int": _NUMERIC, "categorical": ("choices",)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrunerConfig:
    kind: Pruner = "median"
    """median: stop a trial whose F1 is below the median of earlier trials at the same step; none: never."""
    startup_trials: int = 5
    """Trials that finish before the median pruner prunes any (Optuna's n_startup_trials)."""
    warmup_epochs: int = 5
    """Steps (epochs, counted over a trial's folds) a trial runs before it can be pruned (n_warmup_steps)."""

    def __post_init__(self):
        check_choices(self, "hpo.pruner")
        for key in ("startup_trials", "warmup_epochs"):
            require(getattr(self, key) >= 0, f"hpo.pruner.{key}", getattr(self, key), "it must be >= 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchDimension:
    """One `[hpo.space]` entry, e.g. "optim.lr" = { type = "float", low = 1e-5, high = 1e-2, log = true }.
    Its rules need its key for their messages, so `HpoConfig` checks it with `check(key)`."""
    type: SpaceKind | None = None
    """float or int (sampled in [low, high]) or categorical (one of `choices`); required."""
    low: float | None = None
    """Lower bound (float and int)."""
    high: float | None = None
    """Upper bound, above low (float and int)."""
    log: bool = False
    """Sample on a log scale (needs low > 0)."""
    step: float | None = None
    """Sample only low + k * step (float and int; not with log)."""
    choices: tuple[Any, ...] = ()
    """The values a categorical parameter takes."""

    def given(self) -> list[str]:
        """The keys set away from their defaults (what the file wrote, besides type)."""
        return [f.name for f in dataclasses.fields(self)
                if f.name != "type" and getattr(self, f.name) != f.default]

    def check(self, key: str) -> None:
        require(self.type in KIND_KEYS, f"{key}.type", self.type, f"give one of {', '.join(options(SpaceKind))}")
        for name in self.given():  # a categorical's bounds would be silently ignored otherwise
            require(name in KIND_KEYS[self.type], f"{key}.{name}", getattr(self, name),
                    f"a {self.type} parameter takes {', '.join(KIND_KEYS[self.type])}")
        if self.type == "categorical":
            require(bool(self.choices), f"{key}.choices", list(self.choices), "give a non-empty list")
            return
        require(self.low is not None and self.high is not None and self.low < self.high, f"{key}.low", self.low,
                f"give numbers low < high (high = {self.high!r})")
        require(not self.log or self.low > 0, f"{key}.low", self.low, "a log scale needs low > 0")
        require(self.step is None or self.step > 0, f"{key}.step", self.step, "it must be > 0")
        require(self.step is None or not self.log, f"{key}.step", self.step, "a log scale takes no step")

    def samples(self) -> list[Any]:
        """Values that every config of the search must accept: the choices, or both bounds."""
        if self.type == "categorical":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.type == "int" else [self.low, self.high]

    def holds(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def as_table(self) -> dict[str, Any]:
        """The entry as the file wrote it (for study.json): type and the keys it set."""
        table: dict[str, Any] = {"type": self.type}
        for name in self.given():
            value = getattr(self, name)
            table[name] = list(value) if name == "choices" else (
                int(value) if self.type == "int" and name != "log" else value)
        return table


@dataclasses.dataclass(frozen=True, kw_only=True)
class HpoConfig:
    """The `[hpo]` table: it turns a study into an Optuna search (phase 3)."""
    trials: int = 20
    """Total finished (complete + pruned) trials; a rerun tops up to this (`--trials` overrides it)."""
    folds: tuple[int, ...] = ()
    """Folds each trial trains, one after the other; the objective is their mean. Empty: study.folds."""
    storage: str = ""
    """Optuna storage, any SQLAlchemy URL (postgresql://...); empty: sqlite:///DIR/optuna.db."""
    seed: int = 0
    """TPE sampler seed; worker w of a run uses seed + w."""
    enqueue_base: bool = True
    """Trial 0 is the base config's values (the report's baseline), when they lie inside the space."""
    heartbeat_s: int = 0
    """> 0: trials of a machine silent for 2 beats are failed and retried (machines sharing a storage)."""
    pruner: PrunerConfig = dataclasses.field(default_factory=PrunerConfig)
    """How trials are stopped early on their per-epoch validation F1."""
    space: dict[str, SearchDimension] = dataclasses.field(default_factory=dict)
    """The searched keys (section.key of the training config) and their ranges."""

    def __post_init__(self):
        require(self.trials >= 1, "hpo.trials", self.trials, "it must be >= 1")
        require(self.heartbeat_s >= 0, "hpo.heartbeat_s", self.heartbeat_s, "give 0 (off) or seconds > 0")
        require(bool(self.space), "hpo.space", self.space, 'declare at least one parameter, e.g. "optim.lr" = '
                '{ type = "float", low = 1e-5, high = 1e-2, log = true }')
        for key, dim in self.space.items():
            dim.check(f"hpo.space.{key}")
