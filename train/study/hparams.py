"""TensorBoard's HParams view for study runs: each finished run's axes and the searched or varied config
values, against its best epoch's validation metrics.

Written into the run's own `tensorboard/` folder, beside its curves, so `tensorboard --logdir DIR`
shows one HParams row per run (variant, model, fold, seed or trial) and links it to its scalars.
A run gets its summary once, when it finishes (`hparams.done` marks it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from stacktrain.train.results import RESULTS_NAME, load_results

MARK = "hparams.done"
# Config values that studies vary (phases 1-3), shown for every run.
CONFIG_KEYS = (("model", "name"), ("preprocess", "normalize"), ("patch", "size"), ("patch", "stride"),
               ("optim", "lr"), ("optim", "weight_decay"), ("loader", "batch_size"), ("train", "pos_weight"),
               ("train", "aggregate"), ("train", "seed"))


def _value(value: Any) -> Any:
    if isinstance(value, bool) or isinstance(value, (int, float, str)):
        return value
    return "none" if value is None else str(value)


def run_hparams(record: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's axes (from its study_run.json record), the usual config keys, and a trial's parameters."""
    hp: dict[str, Any] = {k: _value(record.get(k)) for k in ("variant", "model", "fold", "seed", "trial")
                          if record.get(k) is not None}
    config = record["config"]
    for section, key in CONFIG_KEYS:
        if key in config.get(section, {}):
            hp[f"{section}.{key}"] = _value(config[section][key])
    hp.update({k: _value(v) for k, v in (params or {}).items()})
    return hp


def best_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The best epoch's validation metrics (NaN ones left out: TensorBoard cannot plot them)."""
    best = next(e for e in results["epochs"] if e["epoch"] == results["best_epoch"])
    values = {"best/stack_f1_MALADE": best["volume_metrics"]["f1"]["MALADE"],
              "best/stack_roc_auc": best["volume_metrics"].get("roc_auc"),
              "best/patch_f1_MALADE": best["patch_metrics"]["f1"]["MALADE"],
              "best/val_loss": best["val_loss"], "best/epoch": float(results["best_epoch"])}
    return {k: float(v) for k, v in values.items() if v is not None and not math.isnan(float(v))}


def record_hparams(run_dir: Path, record: dict[str, Any], params: dict[str, Any] | None = None) -> bool:
    """Write the run's HParams summary if it finished and has none yet; True when written."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS_NAME
    if (run_dir / "tensorboard" / MARK).exists() or not path.exists():
        return False
    results = load_results(path, samples="none")
    if results.get("stop_reason") in (None, "pruned") or results.get("best_epoch") is None:
        return False
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    metrics = best_metrics(results)
    experiment, start, end = hparams(run_hparams(record, params), metrics)
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for summary in (experiment, start, end):
            writer.file_writer.add_summary(summary)
        for tag, value in metrics.items():  # the metric tags the HParams view plots must exist as scalars
            writer.add_scalar(tag, value, results["best_epoch"])
    (run_dir / "tensorboard" / MARK).touch()
    return True
