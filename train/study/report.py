"""`stacktrain report STUDY_DIR`: compare a study's variants with confidence intervals, and say which wins.

For each label (variant, model, or trial) and level (patch, stack), from each fold's best epoch:
F1 of MALADE and SAIN, accuracy, ROC-AUC as mean ± std over folds (the fold values come straight
from training_results.json) with a 95 % bootstrap CI over stacks (train/stats.py), the best epoch and
the training throughput (median over epochs of patches/s, mean over folds). Then paired differences
against the baseline on the folds both have, and a verdict: the best label at the primary level
(default: the runs' train.select_level) and whether the paired CI against the runner-up excludes 0.

Writes into STUDY_DIR: report.md, report.csv, differences.csv and the PNG plots (train/plots.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from stacktrain import ui
from stacktrain.config import relative_paths
from stacktrain.io import atomic_write, atomic_write_json
from stacktrain.train.config import PATH_KEYS
from stacktrain.train.results import RESULTS_NAME
from stacktrain.train.study.collect import Run, load_runs
from stacktrain.train.study.config import StudyError
from stacktrain.train.study.render import markdown, rich_tables, write_csvs
from stacktrain.train.study.runs import record_config
from stacktrain.train.study.selection import RUN_KEYS, SELECTION, ranking
from stacktrain.train.study.stats import (
    LEVELS,
    METRICS,
    bootstrap,
    paired_bootstrap,
    percentile_ci,
)

CONFIDENCE = 0.95


@dataclasses.dataclass
class Row:
    label: str
    level: str
    folds: list[int]
    n_stacks: int
    mean: dict[str, float]
    std: dict[str, float]
    ci: dict[str, tuple[float, float]]
    fold_values: dict[str, list[float]]
    samples: dict[str, np.ndarray]
    best_epochs: list[int]
    throughput: float
    runs: list[tuple] = dataclasses.field(default_factory=list)
    """(fold, seed) of every run, in the order of fold_values and best_epochs."""
    patients: tuple[int, int] = (0, 0)
    """Fewest validation patients of a class in one fold: (SAIN, MALADE)."""
    steps_per_epoch: float | None = None


@dataclasses.dataclass
class Diff:
    label: str
    other: str
    level: str
    folds: list[int]
    mean: dict[str, float]
    std: dict[str, float]
    ci: dict[str, tuple[float, float]]


def summarize(groups: dict[str, dict[tuple, Run]], *, n_resamples: int, seed: int) -> list[Row]:
    """Per label and level: mean ± std over its runs (folds x seeds), and the patient bootstrap CI."""
    rows = []
    for label, runs in groups.items():
        keys = sorted(runs, key=_key_order)
        preds = [runs[k].predictions() for k in keys]
        per_fold = {p.fold: p.patients_per_class() for p in preds}
        fewest = (min(v[0] for v in per_fold.values()), min(v[1] for v in per_fold.values()))
        steps = [runs[k].steps_per_epoch for k in keys]
        for level in LEVELS:
            values = {m: [runs[k].metrics(level)[m] for k in keys] for m in METRICS}
            samples = bootstrap(preds, level, n_resamples=n_resamples, seed=seed)
            rows.append(Row(label=label, level=level, folds=sorted({k[0] for k in keys}),
                            n_stacks=sum(len(p.stack_ids) for p in preds),
                            mean={m: _nanmean(v) for m, v in values.items()},
                            std={m: _nanstd(v) for m, v in values.items()},
                            ci={m: percentile_ci(samples[m], CONFIDENCE) for m in METRICS},
                            fold_values=values, samples=samples,
                            best_epochs=[runs[k].results["best_epoch"] for k in keys],
                            throughput=float(np.mean([runs[k].throughput for k in keys])), runs=keys,
                            patients=fewest, steps_per_epoch=None if None in steps else float(np.mean(steps))))
    return rows


def _key_order(key: tuple) -> tuple[int, int]:
    return key[0], -1 if key[1] is None else key[1]


def _nanmean(values: list[float]) -> float:
    v = np.array(values, np.float64)
    return float(np.mean(v[~np.isnan(v)])) if (~np.isnan(v)).any() else float("nan")


def _nanstd(values: list[float]) -> float:
    v = np.array(values, np.float64)
    v = v[~np.isnan(v)]
    return float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


def difference(groups: dict[str, dict[int, Run]], label: str, other: str, level: str, *,
               n_resamples: int, seed: int) -> Diff | None:
    """label - other on the folds both finished; None when they share none."""
    folds = sorted(set(groups[label]) & set(groups[other]), key=_key_order)
    if not folds:
        return None
    a, b = [groups[label][f] for f in folds], [groups[other][f] for f in folds]
    per_fold = {m: [x.metrics(level)[m] - y.metrics(level)[m] for x, y in zip(a, b)] for m in METRICS}
    try:
        samples = paired_bootstrap([r.predictions() for r in a], [r.predictions() for r in b], level,
                                   n_resamples=n_resamples, seed=seed, names=(label, other))
    except ValueError as e:  # the study guards against it; a hand-assembled directory may not
        raise StudyError(f"{a[0].run_dir.parent}: {e}") from None
    return Diff(label=label, other=other, level=level, folds=folds,
                mean={m: _nanmean(v) for m, v in per_fold.items()}, std={m: _nanstd(v) for m, v in per_fold.items()},
                ci={m: percentile_ci(samples[m], CONFIDENCE) for m in METRICS})


def verdict(rows: list[Row], groups: dict[str, dict[tuple, Run]], level: str, *, n_resamples: int, seed: int,
            hpo: bool) -> str:
    """One plain sentence: the selected label (selection.ranking: the training loop's rule, so a one-class
    model never wins) and whether the paired patient bootstrap separates it from the runner-up."""
    ranked = ranking(groups, level)
    by_label = {r.label: r for r in rows if r.level == level}
    best = by_label[ranked[0][0]]
    n = len(best.runs)
    head = (f"Best: {best.label}, {level}-level F1 MALADE {best.mean['f1_malade']:.3f} (selection score "
            f"{ranked[0][1][0]:.3f}, mean of {n} run(s): {len(best.folds)} fold(s) x {n // max(1, len(best.folds))} "
            "seed(s)).")
    few = min(best.patients)
    caveat = (f" Caution: the CIs rest on as few as {few} validation patient(s) per class in a fold (fewer than "
              "about 10), so they are rough." if few < 10 else "")
    caveat += (f" It was picked among {len(ranked)} trials, so its own score is optimistic; the held-out test "
               "part (`--final`) is the unbiased check." if hpo else "")
    if len(ranked) == 1:
        return head + " It is the only finished variant, so there is nothing to separate it from." + caveat
    runner = by_label[ranked[1][0]]
    diff = difference(groups, best.label, runner.label, level, n_resamples=n_resamples, seed=seed)
    if diff is None:
        return head + f" The runner-up {runner.label} shares no run with it, so they cannot be compared." + caveat
    lo, hi = diff.ci["f1_malade"]
    gap = (f"its paired difference with the runner-up {runner.label} is {diff.mean['f1_malade']:+.3f} "
           f"(95% CI [{lo:+.3f}, {hi:+.3f}] over patients, {len(diff.folds)} run(s))")
    if lo == hi and lo != 0:  # every resample agrees: too few patients per class to resample
        return (f"{head} The evidence cannot say whether it is separated from the runner-up: {gap}, but the "
                "bootstrap has no spread because the folds hold too few validation patients per class; use "
                f"more patients or folds.{caveat}")
    if lo > 0:
        return f"{head} The evidence separates it from the runner-up: {gap}, which excludes 0.{caveat}"
    return (f"{head} The evidence does not separate it from the runner-up: {gap}, which includes 0; "
            f"more folds or patients are needed to tell them apart.{caveat}")


def report(study_dir: str | Path, *, level: str | None = None, n_resamples: int = 2000, seed: int = 0,
           plots: bool = True, storage: str | None = None, console: Console | None = None) -> dict[str, Any]:
    """Build, print and write the report; returns {rows, diffs, verdict, files}."""
    if n_resamples < 1:
        raise StudyError(f"--resamples {n_resamples}: give at least 1 bootstrap resample (default 2000; "
                         "1,000 or more for a CI worth reading)")
    console = console or ui.console()
    study_dir = Path(study_dir)
    if (study_dir / RESULTS_NAME).exists() and not (study_dir / "study.json").exists():  # one run, no study
        from stacktrain.train.study.run_report import report_run
        return report_run(study_dir, n_resamples=n_resamples, seed=seed, plots=plots, console=console)
    manifest, groups, notes = load_runs(study_dir, storage=storage)
    hpo = manifest["kind"] == "hpo"
    baseline = manifest["baseline"]
    first = next(iter(next(iter(groups.values())).values()))
    level = level or first.record["config"]["train"]["select_level"]
    rows = summarize(groups, n_resamples=n_resamples, seed=seed)
    diffs = []
    if baseline in groups:
        for label in groups:
            for lv in LEVELS:
                d = None if label == baseline else difference(groups, label, baseline, lv,
                                                              n_resamples=n_resamples, seed=seed)
                diffs += [d] if d is not None else []
    else:
        notes.append(f"the baseline {baseline!r} has no finished run: no paired differences")
    sentence = verdict(rows, groups, level, n_resamples=n_resamples, seed=seed, hpo=hpo)
    budgets = {r.label: r.steps_per_epoch for r in rows if r.level == level and r.steps_per_epoch}
    if budgets and max(budgets.values()) > 1.1 * min(budgets.values()):
        notes.append("optimizer budgets differ: steps per epoch " + ", ".join(
            f"{k} {v:.0f}" for k, v in budgets.items()) + " at the same epochs and patience (overlap, foreground "
            "filter or balancing change the patches per epoch); a gap may come from the budget, not the variant: "
            "give every run the same budget with set = [\"loader.steps_per_epoch=N\"] in the study")
    final_path = study_dir / "final.json"
    final = json.loads(final_path.read_text()) if final_path.exists() else None
    files = []
    if plots:
        from stacktrain.train.study import plots as plotting
        files = plotting.study_plots(study_dir, rows, groups, manifest, notes)
    text = markdown(rows, diffs, sentence, notes, manifest["name"], files, manifest.get("descriptions", {}),
                    level=level, final=final, chain=manifest.get("chain", []))
    atomic_write(study_dir / "report.md", lambda f: f.write(text.encode()))
    write_csvs(study_dir, rows, diffs)
    for table in rich_tables(rows, diffs, manifest["name"], level=level, final=final):
        console.print(table)
    console.print(sentence, highlight=False)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    written = ["report.md", "report.csv", "differences.csv", *(Path(f).name for f in files)]
    console.print(f"wrote {', '.join(written)} in {study_dir}", highlight=False)
    return {"rows": rows, "diffs": diffs, "verdict": sentence, "files": written, "notes": notes, "final": final}


def write_selection(study_dir: Path, storage: str | None = None) -> dict[str, Any]:
    """Rank the finished study's labels and record the winner with its runs and config."""
    manifest, groups, notes = load_runs(study_dir, samples="none", storage=storage)
    first = next(iter(next(iter(groups.values())).values()))
    level = first.record["config"]["train"]["select_level"]
    ranked = ranking(groups, level)
    label, key = ranked[0]
    runs = groups[label]
    keys = sorted(runs, key=_sort_key)
    chosen = runs[keys[0]]
    config = record_config(chosen.record, chosen.run_dir)
    for section, name in RUN_KEYS:
        config.get(section, {}).pop(name, None)
    relative_paths(config, PATH_KEYS, study_dir)  # as the study directory holds it (selection.parent_base)
    selection = {"label": label, "level": level, "score": key[0], "stack_roc_auc": key[1], "val_loss": -key[2],
                 "variant": chosen.record["variant"], "model": chosen.record["model"],
                 "runs": [runs[k].run_dir.relative_to(study_dir).as_posix() for k in keys],
                 "ranking": [{"label": lb, "score": k[0], "stack_roc_auc": k[1]} for lb, k in ranked],
                 "config": config, "split_sha256": manifest["split_sha256"], "notes": notes}
    atomic_write_json(study_dir / SELECTION, selection)
    return selection


def _sort_key(key: tuple[int, int | None]) -> tuple[int, int]:
    return key[0], -1 if key[1] is None else key[1]
