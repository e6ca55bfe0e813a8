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

import csv
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from stacktrain.io import atomic_write
from stacktrain.train.results import RESULTS_NAME, RunResults, load_results
from stacktrain.train.study.config import StudyError
from stacktrain.train.study.runner import read_manifest
from stacktrain.train.study.runs import RUN_RECORD
from stacktrain.train.study.stats import (
    LEVELS,
    METRIC_NAMES,
    METRICS,
    FoldPredictions,
    bootstrap,
    fold_predictions,
    json_metrics,
    paired_bootstrap,
    percentile_ci,
)

CONFIDENCE = 0.95


@dataclasses.dataclass
class Run:
    label: str
    fold: int
    run_dir: Path
    record: dict[str, Any]
    results: RunResults

    @property
    def best(self) -> dict[str, Any]:
        return self.results.best

    def predictions(self) -> FoldPredictions:
        return fold_predictions(self.best, self.fold)

    def metrics(self, level: str) -> dict[str, float]:
        return json_metrics(self.results.metrics(level))

    @property
    def throughput(self) -> float:
        return statistics.median(e["throughput"]["train_patches_per_s"] for e in self.results["epochs"])


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


@dataclasses.dataclass
class Diff:
    label: str
    other: str
    level: str
    folds: list[int]
    mean: dict[str, float]
    std: dict[str, float]
    ci: dict[str, tuple[float, float]]


# -- collecting ------------------------------------------------------------------------------------
def load_runs(study_dir: Path) -> tuple[dict[str, Any], dict[str, dict[int, Run]], list[str]]:
    """The manifest, finished runs by label then fold (in study order), and notes on the rest."""
    manifest = read_manifest(study_dir)
    records = [json.loads(p.read_text()) | {"_dir": p.parent} for p in
               [*study_dir.glob(f"runs/*/{RUN_RECORD}"), *study_dir.glob(f"trials/*/*/{RUN_RECORD}")]]
    order = {name: i for i, name in enumerate(manifest["variants"] + manifest["models"])}
    records.sort(key=lambda r: (r["trial"] if r["trial"] is not None else -1, order.get(r["variant"], 0),
                                order.get(r["model"], 0), r["fold"]))
    groups: dict[str, dict[int, Run]] = {}
    unfinished, pruned = [], 0
    for rec in records:
        path = rec["_dir"] / RESULTS_NAME
        results = load_results(path) if path.exists() else None
        if results is None or results["stop_reason"] is None or results["best_epoch"] is None:
            unfinished.append(rec["_dir"].relative_to(study_dir).as_posix())
            continue
        if results["stop_reason"] == "pruned":
            pruned += 1
            continue
        groups.setdefault(rec["label"], {})[rec["fold"]] = Run(rec["label"], rec["fold"], rec["_dir"], rec,
                                                               results)
    notes = []
    if unfinished:
        notes.append(f"{len(unfinished)} run(s) unfinished and left out ({', '.join(unfinished[:4])}"
                     f"{', ...' if len(unfinished) > 4 else ''}); rerun `stacktrain study` to finish them")
    if pruned:
        notes.append(f"{pruned} pruned trial run(s) left out of the table (they stopped early)")
    if manifest["kind"] == "hpo":  # trials whose folds are not all finished are not comparable
        want = len(manifest["hpo"]["folds"])
        groups = {k: v for k, v in groups.items() if len(v) == want}
    if not groups:
        raise StudyError(f"{study_dir}: no finished run to report; run `stacktrain study ... --out "
                         f"{study_dir}` first (or let it finish)")
    return manifest, groups, notes


def summarize(groups: dict[str, dict[int, Run]], *, n_resamples: int, seed: int) -> list[Row]:
    rows = []
    for label, runs in groups.items():
        folds = sorted(runs)
        preds = [runs[f].predictions() for f in folds]
        for level in LEVELS:
            values = {m: [runs[f].metrics(level)[m] for f in folds] for m in METRICS}
            samples = bootstrap(preds, level, n_resamples=n_resamples, seed=seed)
            rows.append(Row(label=label, level=level, folds=folds, n_stacks=sum(len(p.stack_ids) for p in preds),
                            mean={m: _nanmean(v) for m, v in values.items()},
                            std={m: _nanstd(v) for m, v in values.items()},
                            ci={m: percentile_ci(samples[m], CONFIDENCE) for m in METRICS},
                            fold_values=values, samples=samples,
                            best_epochs=[runs[f].results["best_epoch"] for f in folds],
                            throughput=float(np.mean([runs[f].throughput for f in folds]))))
    return rows


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
    folds = sorted(set(groups[label]) & set(groups[other]))
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


def verdict(rows: list[Row], groups: dict[str, dict[int, Run]], level: str, *, n_resamples: int, seed: int,
            hpo: bool) -> str:
    """One plain sentence: the best label on F1 MALADE at `level`, and whether it is separated."""
    ranked = sorted((r for r in rows if r.level == level), key=lambda r: -np.nan_to_num(r.mean["f1_malade"], nan=-1))
    best = ranked[0]
    head = (f"Best: {best.label}, {level}-level F1 MALADE {best.mean['f1_malade']:.3f} "
            f"(mean of {len(best.folds)} fold(s)).")
    if len(ranked) == 1:
        return head + " It is the only finished variant, so there is nothing to separate it from."
    runner = ranked[1]
    diff = difference(groups, best.label, runner.label, level, n_resamples=n_resamples, seed=seed)
    caveat = (f" It was picked among {len(ranked)} trials, so its own score is optimistic; confirm it on "
              "folds the search did not use." if hpo else "")
    if diff is None:
        return head + f" The runner-up {runner.label} shares no fold with it, so they cannot be compared." + caveat
    lo, hi = diff.ci["f1_malade"]
    gap = (f"its paired difference with the runner-up {runner.label} is {diff.mean['f1_malade']:+.3f} "
           f"(95% CI [{lo:+.3f}, {hi:+.3f}] over stacks, {len(diff.folds)} fold(s))")
    if lo == hi and lo != 0:  # every resample agrees: too few stacks per class to resample
        return (f"{head} The evidence cannot say whether it is separated from the runner-up: {gap}, but the "
                "bootstrap has no spread because the folds hold too few validation stacks per class; use "
                f"more stacks or folds.{caveat}")
    if lo > 0:
        return f"{head} The evidence separates it from the runner-up: {gap}, which excludes 0.{caveat}"
    return (f"{head} The evidence does not separate it from the runner-up: {gap}, which includes 0; "
            f"more folds or stacks are needed to tell them apart.{caveat}")


# -- rendering -------------------------------------------------------------------------------------
def _num(x: float, signed: bool = False) -> str:
    return "–" if x is None or np.isnan(x) else (f"{x:+.3f}" if signed else f"{x:.3f}")


def cell(mean: float, std: float, ci: tuple[float, float], signed: bool = False, sep: str = " ") -> str:
    """`0.812 ± 0.050 [0.700, 0.900]`: mean ± std over folds, then the bootstrap CI."""
    spread = "" if np.isnan(std) else f" ± {std:.3f}"
    return f"{_num(mean, signed)}{spread}{sep}[{_num(ci[0], signed)}, {_num(ci[1], signed)}]"


def _epochs(values: list[int]) -> str:
    return ", ".join(map(str, values)) if len(values) <= 5 else f"{np.mean(values):.1f} (mean)"


def rich_tables(rows: list[Row], diffs: list[Diff], title: str) -> list[Table]:
    """One table per level (mean ± std over folds, CI below), then the paired differences per level."""
    tables = []
    for level in LEVELS:
        table = Table(title=f"{title}, {level} level: mean ± std over folds, [95% bootstrap CI over stacks]")
        for col in ("variant", "folds", "stacks", *(METRIC_NAMES[m] for m in METRICS), "best epoch", "patches/s"):
            table.add_column(col, justify="left" if col == "variant" else "right")
        for r in (r for r in rows if r.level == level):
            table.add_row(r.label, str(len(r.folds)), str(r.n_stacks),
                          *(cell(r.mean[m], r.std[m], r.ci[m], sep="\n") for m in METRICS),
                          _epochs(r.best_epochs), f"{r.throughput:.1f}")
        tables.append(table)
    for level in LEVELS:
        level_diffs = [d for d in diffs if d.level == level]
        if not level_diffs:
            continue
        table = Table(title=f"{level} level: paired differences against the baseline {level_diffs[0].other} "
                            "(same folds, same resampled stacks)")
        for col in ("variant", "folds", *(f"Δ {METRIC_NAMES[m]}" for m in METRICS)):
            table.add_column(col, justify="left" if col == "variant" else "right")
        for d in level_diffs:
            table.add_row(d.label, str(len(d.folds)),
                          *(cell(d.mean[m], d.std[m], d.ci[m], signed=True, sep="\n") for m in METRICS))
        tables.append(table)
    return tables


CAVEAT = ("The bootstrap CIs show the uncertainty that comes from the finite number of validation stacks, "
          "for the trained models as they are; the spread between trainings (folds, seeds) is in the ± std.")


def markdown(rows: list[Row], diffs: list[Diff], sentence: str, notes: list[str], title: str,
             plots: list[str], descriptions: dict[str, str]) -> str:
    head = ["variant", "level", "folds", "stacks", *(METRIC_NAMES[m] for m in METRICS), "best epoch", "patches/s"]
    lines = [f"# Study report: {title}", "", sentence, "",
             "Mean ± std over folds (each fold's best epoch), then the 95% bootstrap CI over stacks.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([r.label, r.level, str(len(r.folds)), str(r.n_stacks),
                                 *(cell(r.mean[m], r.std[m], r.ci[m]) for m in METRICS),
                                 _epochs(r.best_epochs), f"{r.throughput:.1f}"]) + " |" for r in rows]
    if diffs:
        head = ["variant", "level", "folds", *(f"Δ {METRIC_NAMES[m]}" for m in METRICS)]
        lines += ["", f"## Paired differences against the baseline `{diffs[0].other}`", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join([d.label, d.level, str(len(d.folds)),
                                     *(cell(d.mean[m], d.std[m], d.ci[m], signed=True) for m in METRICS)]) + " |"
                  for d in diffs]
    if descriptions:
        lines += ["", "## Variants", "", *[f"- `{k}`: {v}" for k, v in descriptions.items()]]
    lines += ["", *[f"- {n}" for n in [CAVEAT, *notes]], "",
              *[f"![{Path(p).stem}]({Path(p).name})" for p in plots]]
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def write_csvs(out: Path, rows: list[Row], diffs: list[Diff]) -> None:
    stats = ["mean", "std", "ci_low", "ci_high"]
    metric_cols = [f"{m}_{s}" for m in METRICS for s in stats]
    flat = lambda x: [v for m in METRICS for v in (x.mean[m], x.std[m], *x.ci[m])]  # noqa: E731
    _write_csv(out / "report.csv", ["variant", "level", "folds", "n_stacks", *metric_cols, "best_epochs",
                                    "train_patches_per_s"],
               [[r.label, r.level, len(r.folds), r.n_stacks, *flat(r), " ".join(map(str, r.best_epochs)),
                 r.throughput] for r in rows])
    _write_csv(out / "differences.csv", ["variant", "baseline", "level", "folds", *metric_cols],
               [[d.label, d.other, d.level, len(d.folds), *flat(d)] for d in diffs])


def report(study_dir: str | Path, *, level: str | None = None, n_resamples: int = 2000, seed: int = 0,
           plots: bool = True, console: Console | None = None) -> dict[str, Any]:
    """Build, print and write the report; returns {rows, diffs, verdict, files}."""
    console = console or Console()
    study_dir = Path(study_dir)
    manifest, groups, notes = load_runs(study_dir)
    hpo = manifest["kind"] == "hpo"
    baseline = ("trial-0" if "trial-0" in groups else next(iter(groups))) if hpo else manifest["baseline"]
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
    if min(r.n_stacks for r in rows) < 20:
        notes.append("few validation stacks (< 20 per label): the bootstrap CIs are rough")
    files = []
    if plots:
        from stacktrain.train.study import plots as plotting
        files = plotting.study_plots(study_dir, rows, groups, manifest, notes)
    text = markdown(rows, diffs, sentence, notes, manifest["name"], files, manifest.get("descriptions", {}))
    atomic_write(study_dir / "report.md", lambda f: f.write(text.encode()))
    write_csvs(study_dir, rows, diffs)
    for table in rich_tables(rows, diffs, manifest["name"]):
        console.print(table)
    console.print(sentence, highlight=False)
    for note in notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    written = ["report.md", "report.csv", "differences.csv", *(Path(f).name for f in files)]
    console.print(f"wrote {', '.join(written)} in {study_dir}", highlight=False)
    return {"rows": rows, "diffs": diffs, "verdict": sentence, "files": written, "notes": notes}
