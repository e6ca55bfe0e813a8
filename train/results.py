"""`RUN_DIR/training_results.json`: its schema, how an epoch entry is built, and how it is read.

The byte layout (one JSON document, appended one epoch line at a time, O(that epoch) per write) is
results_io.py: `ResultsWriter` appends, `load_results` reads (optionally the best epoch's samples
only). The schema is checked by `validate_results` (tests, tools), never while training. Timing
fields (`TIMING_KEYS`) are the only ones that differ
between two runs of the same config on the CPU; `strip_timing` removes them for comparisons.
`RESULTS_SCHEMA` is the JSON Schema of the file (generated from the pydantic models below).
"""

from __future__ import annotations

import copy
import datetime as _dt
import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from stacktrain.choices import StopReason, options
from stacktrain.errors import ResultsError
from stacktrain.io import atomic_write  # noqa: F401  (re-exported: tests write files with it)
from stacktrain.train.results_io import ResultsWriter, read_results

SCHEMA_VERSION = 1
RESULTS_NAME = "training_results.json"
TIMING_KEYS = frozenset({"throughput", "wall_s", "started_at", "updated_at"})
STOP_REASONS = options(StopReason)  # pruned: an Optuna study stopped it
PACKAGES = ("torch", "nvidia-dali-cuda130", "nvidia-dali-cuda120", "zarr", "numcodecs", "monai",
            "numpy", "scikit-learn")

# -- the schema ------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PerClass(_Strict):
    SAIN: float
    MALADE: float


class Metrics(_Strict):
    """Binary metrics at one level (patch or stack); predicted label = probability >= 0.5 (at the stack
    level: >= the epoch's `threshold`)."""
    accuracy: float
    balanced_accuracy: float | None = Field(None, description="mean recall of the two classes")
    precision: PerClass
    recall: PerClass
    f1: PerClass
    roc_auc: float | None = Field(description="None when the true labels hold one class only")
    pr_auc: float | None = Field(None, description="average precision of MALADE; None with one class")
    confusion_matrix: list[list[int]] = Field(description="rows true [SAIN, MALADE], columns predicted")


class Sample(_Strict):
    stack_id: str
    position: list[int] = Field(min_length=3, max_length=3, description="patch origin z, y, x in voxels")
    probability: float = Field(ge=0, le=1, description="sigmoid of the patch logit")
    label: Literal[0, 1] = Field(description="true label: 0 SAIN, 1 MALADE")
    padded_fraction: float | None = Field(None, gt=0, lt=1, description="only on a partly padded patch: the "
                                          "share of its voxels outside its stack's valid region (convert --pad's "
                                          "zeros, or past the edge with patch.edge = pad); absent: none padded")


class Volume(_Strict):
    stack_id: str
    aggregated_probability: float = Field(ge=0, le=1, description="mean (max, top-k mean) of its samples")
    predicted_label: Literal[0, 1] = Field(description="1 iff aggregated_probability >= the epoch's threshold "
                                           "(0.5 unless train.threshold = tuned)")
    label: Literal[0, 1]
    n_patches: int = Field(ge=1)


class Throughput(BaseModel):
    """Timing of the epoch's training part; more keys (e.g. peak_memory_gib) may be added."""
    model_config = ConfigDict(extra="allow")
    train_patches_per_s: float
    data_wait_pct: float = Field(description="share of the epoch spent waiting for the loader")


class Epoch(BaseModel):
    model_config = ConfigDict(extra="allow")
    epoch: int = Field(ge=0)
    train_loss: float
    val_loss: float = Field(description="mean BCE over validation patches")
    lr: float
    wall_s: float = Field(description="seconds for the whole epoch (train + validation)")
    throughput: Throughput
    patch_metrics: Metrics
    volume_metrics: Metrics = Field(description="stack metrics at `threshold`")
    threshold: float = Field(0.5, gt=0, lt=1, description="stack threshold: 0.5, or with train.threshold = "
                             "tuned the one that maximises this epoch's validation stack F1 of MALADE")
    fixed_volume_metrics: Metrics | None = Field(None, description="with a tuned threshold: the stack metrics "
                                                 "at 0.5, for comparison")
    samples: list[Sample] = Field(description="in the file for every epoch (load_results(samples='best') "
                                  "leaves it out of the other epochs)")
    volumes: list[Volume]


class ConfigChange(_Strict):
    """A config key that `--resume` changed (train/resume.py RESUMABLE), from epoch `epoch` on."""
    epoch: int = Field(ge=0, description="the first epoch trained with the new value")
    key: str
    old: Any
    new: Any


class Results(_Strict):
    schema_version: Literal[1]
    config: dict[str, Any] = Field(description="the resolved TrainConfig (train/config.py)")
    environment: dict[str, Any] = Field(description="package versions, python, device")
    started_at: str
    updated_at: str
    best_epoch: int | None = Field(description="epoch of best.pt (highest validation F1 of MALADE)")
    stop_reason: str | None = Field(description="None while running, else one of " + ", ".join(STOP_REASONS))
    epochs: list[Epoch]
    config_changes: list[ConfigChange] = Field(default_factory=list, description="allowed changes made by "
                                               "--resume; `config` holds the values in force at the end")


RESULTS_SCHEMA: dict[str, Any] = Results.model_json_schema()


def validate_results(results: dict[str, Any], where: str = RESULTS_NAME) -> None:
    """Raise ResultsError listing every place where `results` departs from RESULTS_SCHEMA."""
    try:
        Results.model_validate(results)
    except pydantic.ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:10])
        raise ResultsError(f"{where}: does not match the results schema ({e.error_count()} problems): "
                           f"{problems}") from None


# -- building ----------------------------------------------------------------------------------------
def now() -> str:
    """The time stamp of `started_at` / `updated_at`: UTC, ISO 8601, seconds."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def environment_info(device: Any = None, world_size: int = 1) -> dict[str, Any]:
    """Versions of python and the packages that shape the numbers, and the device's name."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    import torch
    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        extra = {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    else:
        name, extra = platform.processor() or platform.machine(), {"cpu_count": os.cpu_count()}
    return {"versions": versions, "device": dev.type, "device_name": name, "world_size": world_size,
            "platform": platform.platform(), **extra}


# -- reading -----------------------------------------------------------------------------------------
LEVEL_KEYS = {"patch": "patch_metrics", "stack": "volume_metrics"}  # the seed's names, per level


def level_metrics(entry: dict[str, Any], level: str) -> dict[str, Any]:
    """An epoch entry's metrics at `level` (patch or stack)."""
    return entry[LEVEL_KEYS[level]]


def f1_malade(entry: dict[str, Any], level: str) -> float:
    """The selection score: validation F1 of MALADE at `level`."""
    return level_metrics(entry, level)["f1"]["MALADE"]


class RunResults(dict):
    """A results file as the dict it is in JSON (the seed's field names, unchanged), with typed accessors
    for what every reader needs: the epochs, the best epoch's entry and its metrics per level."""

    @property
    def epochs(self) -> list[dict[str, Any]]:
        return self["epochs"]

    def epoch(self, number: int) -> dict[str, Any]:
        for entry in self["epochs"]:
            if entry["epoch"] == number:
                return entry
        raise ResultsError(f"epoch {number} is not in the results (epochs {len(self['epochs'])})")

    @property
    def best(self) -> dict[str, Any] | None:
        """The entry of `best_epoch` (the epoch of best.pt), or None before any epoch."""
        return None if self["best_epoch"] is None else self.epoch(self["best_epoch"])

    def metrics(self, level: str, epoch: int | None = None) -> dict[str, Any]:
        """Metrics at `level` of `epoch` (default: the best epoch)."""
        entry = self.best if epoch is None else self.epoch(epoch)
        if entry is None:
            raise ResultsError("no epoch has finished yet: the results hold no metrics")
        return level_metrics(entry, level)


def new_results(config: dict[str, Any], environment: dict[str, Any]) -> RunResults:
    stamp = now()
    return RunResults(schema_version=SCHEMA_VERSION, config=config, environment=environment, started_at=stamp,
                      updated_at=stamp, best_epoch=None, stop_reason=None, epochs=[])


def epoch_entry(*, epoch: int, train_loss: float, lr: float, evaluation: Any, throughput: dict[str, Any],
                wall_s: float, **extra: Any) -> dict[str, Any]:
    """One `epochs` entry from an evaluator.EvalResult; `extra` keys are kept (the schema allows them)."""
    ev = evaluation.to_dict()
    return {"epoch": epoch, "train_loss": float(train_loss), "val_loss": ev["val_loss"], "lr": float(lr),
            "wall_s": float(wall_s), "throughput": dict(throughput),
            "patch_metrics": ev["patch_metrics"], "volume_metrics": ev["volume_metrics"],
            "threshold": ev["threshold"],
            **({"fixed_volume_metrics": ev["fixed_volume_metrics"]} if ev["fixed_volume_metrics"] else {}),
            "samples": ev["samples"], "volumes": ev["volumes"], **extra}


def record_epoch(results: dict[str, Any], entry: dict[str, Any], *, best_epoch: int | None,
                 stop_reason: str | None = None) -> dict[str, Any]:
    """Append an epoch entry and update best_epoch / stop_reason / updated_at (in place)."""
    if stop_reason is not None and stop_reason not in STOP_REASONS:
        raise ValueError(f"stop_reason {stop_reason!r}; use one of {STOP_REASONS}")
    results["epochs"].append(entry)
    results.update(best_epoch=best_epoch, stop_reason=stop_reason, updated_at=now())
    return results


# -- files -------------------------------------------------------------------------------------------
def write_results(path: str | Path, results: dict[str, Any]) -> None:
    """Atomically (re)write the whole results file (no NaN/inf: they are not JSON); the training loop
    appends with `ResultsWriter` instead."""
    ResultsWriter(path, results)


def load_results(path: str | Path, *, upto_epoch: int | None = None, samples: str = "all",
                 validate: bool = False) -> RunResults:
    """Read a results file; with `upto_epoch`, drop later epochs (resume from a checkpoint); `samples`
    "best" keeps only the best epoch's samples (reports over many runs), "none" none of them."""
    path = Path(path)
    results = read_results(path, samples=samples)
    if validate:
        validate_results(results, str(path))
    if upto_epoch is not None:
        results["epochs"] = [e for e in results["epochs"] if e["epoch"] <= upto_epoch]
        results["stop_reason"] = None
    return RunResults(results)


def strip_timing(results: Any) -> Any:
    """A deep copy without the timing keys (TIMING_KEYS), at any depth: for run-to-run equality."""
    if isinstance(results, dict):
        return {k: strip_timing(v) for k, v in results.items() if k not in TIMING_KEYS}
    if isinstance(results, list):
        return [strip_timing(v) for v in results]
    return copy.deepcopy(results)
