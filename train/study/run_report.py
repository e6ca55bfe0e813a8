"""`stacktrain report RUN_DIR`: one training run on its own (no study around it).

Prints and writes into RUN_DIR: `report.md` and `epochs.csv` (one row per epoch: losses, F1 of MALADE
at both levels, stack ROC-AUC, lr, patches/s), `curves.png` (losses and F1 per epoch, the best epoch
marked), and the best epoch's metrics with 95 % bootstrap CIs over patients, as the study report
computes them (stats.py: patients redrawn within class, stacks follow their patient).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from stacktrain import ui
from stacktrain.io import atomic_write_bytes, atomic_write_csv
from stacktrain.stores.reader import Store
from stacktrain.train.results import RESULTS_NAME, f1_malade, level_metrics, load_results
from stacktrain.train.study.config import StudyError
from stacktrain.train.study.stats import LEVELS, METRICS, bootstrap, fold_predictions, json_metrics, percentile_ci

COLUMNS = ("epoch", "train_loss", "val_loss", "patch_f1_MALADE", "stack_f1_MALADE", "stack_roc_auc",
           "stack_threshold", "lr", "patches_per_s")


def epoch_rows(results: dict[str, Any]) -> list[list[Any]]:
    return [[e["epoch"], e["train_loss"], e["val_loss"], f1_malade(e, "patch"), f1_malade(e, "stack"),
             level_metrics(e, "stack").get("roc_auc"), e.get("threshold", 0.5), e["lr"],
             e["throughput"]["train_patches_per_s"]]
            for e in results["epochs"]]


def _groups(store: str | None) -> dict[str, str] | None:
    if not store or not Path(store).exists():
        return None
    return {m.stack_id: m.group for m in Store(store).stacks}


def _curves(results: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    epochs = [e["epoch"] for e in results["epochs"]]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss, f1 = fig.subplots(1, 2)
    loss.plot(epochs, [e["train_loss"] for e in results["epochs"]], label="train")
    loss.plot(epochs, [e["val_loss"] for e in results["epochs"]], label="validation")
    loss.set_title("loss")
    for level in LEVELS:
        f1.plot(epochs, [f1_malade(e, level) for e in results["epochs"]], label=f"{level} F1 (MALADE)")
    f1.axvline(results["best_epoch"], color="grey", linestyle=":", label=f"best epoch {results['best_epoch']}")
    f1.set_ylim(-0.02, 1.02)
    for ax in (loss, f1):
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write_bytes(path, buf.getvalue())


def report_run(run_dir: str | Path, *, n_resamples: int = 2000, seed: int = 0, plots: bool = True,
               console: Console | None = None) -> dict[str, Any]:
    """Print and write the single-run report; returns {rows, best, ci, files}."""
    console = console or ui.console()
    run_dir = Path(run_dir)
    results = load_results(run_dir / RESULTS_NAME, samples="best")
    if results.get("best_epoch") is None:
        raise StudyError(f"{run_dir}: the run has no finished epoch yet; report it after its first epoch")
    rows = epoch_rows(results)
    table = Table(*COLUMNS, title=f"{run_dir} (best epoch {results['best_epoch']}, stop: {results['stop_reason']})")
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row),
                      style="bold" if row[0] == results["best_epoch"] else None)
    best = next(e for e in results["epochs"] if e["epoch"] == results["best_epoch"])
    preds = [fold_predictions(best, results["config"]["data"].get("fold", 0), _groups(results["config"]["data"]
                                                                                          .get("store")))]
    ci_table = Table("level", *METRICS, title=f"best epoch, 95 % bootstrap CI over patients ({n_resamples} resamples)")
    cis: dict[str, dict[str, Any]] = {}
    for level in LEVELS:
        values = json_metrics(level_metrics(best, level))
        samples = bootstrap(preds, level, n_resamples=n_resamples, seed=seed)
        cis[level] = {m: {"value": values[m], "ci": percentile_ci(samples[m])} for m in METRICS}
        ci_table.add_row(level, *(f"{values[m]:.3f} [{cis[level][m]['ci'][0]:.3f}, {cis[level][m]['ci'][1]:.3f}]"
                                  for m in METRICS))
    console.print(table)
    console.print(ci_table)
    atomic_write_csv(run_dir / "epochs.csv", [COLUMNS, *rows])
    lines = [f"# Run {run_dir.name}", "", f"Best epoch {results['best_epoch']}, stop reason "
             f"{results['stop_reason']}.", "", "| level | " + " | ".join(METRICS) + " |",
             "|---|" + "---|" * len(METRICS)]
    lines += ["| " + level + " | " + " | ".join(f"{c['value']:.3f} [{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]"
                                                  for c in cis[level].values()) + " |" for level in LEVELS]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |" for row in rows]
    atomic_write_bytes(run_dir / "report.md", ("\n".join(lines) + "\n").encode())
    files = ["report.md", "epochs.csv"]
    if plots:
        _curves(results, run_dir / "curves.png")
        files.append("curves.png")
    console.print(f"wrote {', '.join(files)} in {run_dir}", highlight=False)
    return {"rows": rows, "best": results["best_epoch"], "ci": cis, "files": files}
