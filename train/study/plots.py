"""The report's PNG plots: stack-level F1 per variant, learning curves, and Optuna's history/importances.

matplotlib's Agg backend (no display). Each function returns the paths it wrote.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from stacktrain.train.results import f1_malade  # noqa: E402

DPI = 120


def _save(fig: Any, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return str(path)


def stack_f1_plot(rows: list[Any], path: Path) -> str:
    """Per variant: the bootstrap distribution of stack-level F1 MALADE (violin), each fold (dots)."""
    rows = [r for r in rows if r.level == "stack"]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 4))
    positions = np.arange(1, len(rows) + 1)
    dists = [r.samples["f1_malade"][~np.isnan(r.samples["f1_malade"])] for r in rows]
    with warnings.catch_warnings():  # a distribution without spread draws no violin: that is fine
        warnings.simplefilter("ignore")
        ax.violinplot([d if d.size else np.array([np.nan]) for d in dists], positions, showextrema=False)
    for x, r in zip(positions, rows):
        values = r.fold_values["f1_malade"]
        ax.scatter(np.full(len(values), x) + np.linspace(-0.08, 0.08, len(values)), values, color="k",
                   s=14, zorder=3, label="fold" if x == 1 else None)
        ax.errorbar(x, r.mean["f1_malade"], yerr=[[r.mean["f1_malade"] - r.ci["f1_malade"][0]],
                                                  [r.ci["f1_malade"][1] - r.mean["f1_malade"]]],
                    fmt="o", color="tab:red", capsize=4, zorder=4, label="mean, 95% CI" if x == 1 else None)
    ax.set_xticks(positions, [r.label for r in rows], rotation=20, ha="right")
    ax.set_ylabel("stack-level F1 (MALADE)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("stack-level F1 (MALADE) per variant\nviolin: bootstrap over stacks; dots: folds; red: mean, 95% CI",
                 fontsize=9)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def learning_curves_plot(groups: dict[str, dict[int, Any]], path: Path) -> str:
    """Validation F1 of MALADE per epoch, patch and stack level; one colour per variant, one line per fold."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, runs) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        for fold, run in sorted(runs.items()):
            epochs = run.results["epochs"]
            x = [e["epoch"] for e in epochs]
            for ax, level in zip(axes, ("patch", "stack")):
                y = [f1_malade(e, level) for e in epochs]
                ax.plot(x, y, color=color, alpha=0.8, marker=".", label=label if fold == min(runs) else None)
                best = run.results["best_epoch"]
                ax.scatter([best], [y[x.index(best)]], color=color, s=40, edgecolor="k", zorder=3)
    for ax, level in zip(axes, ("patch", "stack")):
        ax.set_title(f"validation F1 (MALADE), {level} level; circles: best epoch", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("F1 (MALADE)")
    axes[1].legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def optuna_plots(storage: str, study_name: str, out: Path) -> tuple[list[str], list[str]]:
    """Optuna's optimization history and parameter importances; (paths, notes on what was skipped)."""
    import optuna
    from optuna.visualization import matplotlib as ovm
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    study = optuna.load_study(study_name=study_name, storage=storage)
    paths, notes = [], []
    ax = ovm.plot_optimization_history(study)
    paths.append(_save(ax.figure, out / "optuna_history.png"))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) >= 2 and len({str(t.params) for t in complete}) >= 2:
        ax = ovm.plot_param_importances(study)
        paths.append(_save(ax.figure, out / "optuna_importances.png"))
    else:
        notes.append("parameter importances need 2 or more completed trials with different parameters")
    return paths, notes


def study_plots(out: Path, rows: list[Any], groups: dict[str, dict[int, Any]], manifest: dict[str, Any],
                notes: list[str] | None = None) -> list[str]:
    paths = [stack_f1_plot(rows, out / "stack_f1.png"), learning_curves_plot(groups, out / "learning_curves.png")]
    if manifest["kind"] == "hpo":
        extra, skipped = optuna_plots(manifest["hpo"]["storage"], manifest["hpo"]["study_name"], out)
        paths += extra
        if notes is not None:
            notes += skipped
    return paths
