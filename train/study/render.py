"""The report's renderings: rich tables, report.md, report.csv and differences.csv.

Per label and level: mean ± std over runs (folds x seeds) at each run's best epoch, then the 95 %
patient bootstrap CI; the paired differences; a per-run table (fold, seed) at the primary level; the
held-out test part's metrics, apart and labelled, when `--final` has run; the chain of phases.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from stacktrain.train.study.stats import LEVELS, METRIC_NAMES, METRICS


# -- rendering -------------------------------------------------------------------------------------
def _num(x: float, signed: bool = False) -> str:
    return "–" if x is None or np.isnan(x) else (f"{x:+.3f}" if signed else f"{x:.3f}")


def cell(mean: float, std: float, ci: tuple[float, float], signed: bool = False, sep: str = " ") -> str:
    """`0.812 ± 0.050 [0.700, 0.900]`: mean ± std over folds, then the bootstrap CI."""
    spread = "" if np.isnan(std) else f" ± {std:.3f}"
    return f"{_num(mean, signed)}{spread}{sep}[{_num(ci[0], signed)}, {_num(ci[1], signed)}]"


def _epochs(values: list[int]) -> str:
    return ", ".join(map(str, values)) if len(values) <= 5 else f"{np.mean(values):.1f} (mean)"


def run_rows(rows: list[Any], level: str) -> list[list[str]]:
    """Per run (label, fold, seed): F1 MALADE, F1 SAIN, accuracy, ROC-AUC at `level`, and the best epoch."""
    out = []
    for r in (r for r in rows if r.level == level):
        for i, (fold, seed) in enumerate(r.runs):
            out.append([r.label, str(fold), "–" if seed is None else str(seed),
                        *(_num(r.fold_values[m][i]) for m in METRICS), str(r.best_epochs[i])])
    return out


RUN_HEAD = ["variant", "fold", "seed", *(METRIC_NAMES[m] for m in METRICS), "best epoch"]
TEST_HEAD = ["selected", "runs", "test stacks", "test patients", "F1 MALADE", "F1 SAIN", "balanced accuracy",
             "ROC-AUC", "PR-AUC"]


def test_row(final: dict[str, Any]) -> list[str]:
    m = final["volume_metrics"]
    return [final["label"], str(len(final["runs"])), str(final["n_stacks"]), str(final["n_patients"]),
            _num(m["f1"]["MALADE"]), _num(m["f1"]["SAIN"]), _num(m["balanced_accuracy"]),
            _num(m["roc_auc"]), _num(m["pr_auc"])]


def rich_tables(rows: list[Any], diffs: list[Any], title: str, *, level: str = "stack",
                final: dict[str, Any] | None = None) -> list[Table]:
    """One table per level (mean ± std over runs, CI below), the paired differences per level, the runs,
    and the held-out test part."""
    tables = []
    for level in LEVELS:
        table = Table(title=f"{title}, {level} level: mean ± std over runs (folds x seeds), [95% bootstrap CI "
                            "over patients]")
        for col in ("variant", "runs", "stacks", *(METRIC_NAMES[m] for m in METRICS), "best epoch", "patches/s"):
            table.add_column(col, justify="left" if col == "variant" else "right")
        for r in (r for r in rows if r.level == level):
            table.add_row(r.label, str(len(r.runs)), str(r.n_stacks),
                          *(cell(r.mean[m], r.std[m], r.ci[m], sep="\n") for m in METRICS),
                          _epochs(r.best_epochs), f"{r.throughput:.1f}")
        tables.append(table)
    for level in LEVELS:
        level_diffs = [d for d in diffs if d.level == level]
        if not level_diffs:
            continue
        table = Table(title=f"{level} level: paired differences against the baseline {level_diffs[0].other} "
                            "(same runs, same resampled patients)")
        for col in ("variant", "runs", *(f"Δ {METRIC_NAMES[m]}" for m in METRICS)):
            table.add_column(col, justify="left" if col == "variant" else "right")
        for d in level_diffs:
            table.add_row(d.label, str(len(d.folds)),
                          *(cell(d.mean[m], d.std[m], d.ci[m], signed=True, sep="\n") for m in METRICS))
        tables.append(table)
    table = Table(*RUN_HEAD, title=f"{level} level, per run: every fold and seed at its best epoch")
    for row in run_rows(rows, level):
        table.add_row(*row)
    tables.append(table)
    if final is not None:
        table = Table(*TEST_HEAD, title="HELD-OUT TEST PART (evaluated once, after selection; stack level)")
        table.add_row(*test_row(final))
        tables.append(table)
    return tables


CAVEAT = ("The bootstrap CIs resample validation patients within class (stacks follow their patient): the "
          "uncertainty that comes from the finite number of patients, "
          "for the trained models as they are; the spread between trainings (folds, seeds) is in the ± std.")


def markdown(rows: list[Any], diffs: list[Any], sentence: str, notes: list[str], title: str,
             plots: list[str], descriptions: dict[str, str], *, level: str = "stack",
             final: dict[str, Any] | None = None, chain: list[dict[str, Any]] = ()) -> str:
    head = ["variant", "level", "runs", "stacks", *(METRIC_NAMES[m] for m in METRICS), "best epoch", "patches/s"]
    lines = [f"# Study report: {title}", "", sentence, "",
             "Mean ± std over runs (folds x seeds; each run's best epoch), then the 95% bootstrap CI over "
             "patients (resampled within class; stacks follow their patient). Validation parts only.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([r.label, r.level, str(len(r.runs)), str(r.n_stacks),
                                 *(cell(r.mean[m], r.std[m], r.ci[m]) for m in METRICS),
                                 _epochs(r.best_epochs), f"{r.throughput:.1f}"]) + " |" for r in rows]
    if diffs:
        head = ["variant", "level", "runs", *(f"Δ {METRIC_NAMES[m]}" for m in METRICS)]
        lines += ["", f"## Paired differences against the baseline `{diffs[0].other}`", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join([d.label, d.level, str(len(d.folds)),
                                     *(cell(d.mean[m], d.std[m], d.ci[m], signed=True) for m in METRICS)]) + " |"
                  for d in diffs]
    lines += ["", f"## Per run ({level} level)", "", "| " + " | ".join(RUN_HEAD) + " |", "|" + "---|" * len(RUN_HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in run_rows(rows, level)]
    lines += ["", "## Held-out test part", ""]
    if final is None:
        lines += ["Not evaluated yet: `stacktrain study STUDY --out DIR --final` evaluates the selected "
                  "configuration on the test part, once."]
    else:
        lines += [f"Evaluated once, after selection: {final['method']}.", "",
                  "| " + " | ".join(TEST_HEAD) + " |", "|" + "---|" * len(TEST_HEAD),
                  "| " + " | ".join(test_row(final)) + " |"]
    if chain:
        lines += ["", "## Chain of phases", "", *[f"{i + 1}. `{c['name']}` ({c['dir']}): selected `{c['selected']}`, "
                                                  f"{c['level']}-level score {c['score']:.3f}"
                                                  for i, c in enumerate(chain)], f"{len(chain) + 1}. this study"]
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


def write_csvs(out: Path, rows: list[Any], diffs: list[Any]) -> None:
    stats = ["mean", "std", "ci_low", "ci_high"]
    metric_cols = [f"{m}_{s}" for m in METRICS for s in stats]
    flat = lambda x: [v for m in METRICS for v in (x.mean[m], x.std[m], *x.ci[m])]  # noqa: E731
    _write_csv(out / "report.csv", ["variant", "level", "folds", "n_stacks", *metric_cols, "best_epochs",
                                    "train_patches_per_s"],
               [[r.label, r.level, len(r.folds), r.n_stacks, *flat(r), " ".join(map(str, r.best_epochs)),
                 r.throughput] for r in rows])
    _write_csv(out / "differences.csv", ["variant", "baseline", "level", "folds", *metric_cols],
               [[d.label, d.other, d.level, len(d.folds), *flat(d)] for d in diffs])


