"""Which variant a finished study selected, recorded in DIR/selection.json, and the chain of phases.

The rule is the training loop's, lifted to runs: per label (variant, model, or trial), the mean over its
runs (folds x seeds) of the best epoch's selection score (F1 of MALADE at train.select_level, 0 for a
one-class prediction: evaluator.selection_score), ties broken on the mean stack ROC-AUC, then the mean
validation loss. Only validation parts are read: the held-out test part never takes part.

A later phase whose `study.base` names this directory starts from the recorded config of the selected
label's first run (`parent_base`), and records the chain in its own study.json; a different split file
is refused, since the phases must be selected on the same folds and evaluated on the same test part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from stacktrain.config import anchor_paths
from stacktrain.errors import StudyError
from stacktrain.train.config import PATH_KEYS
from stacktrain.train.evaluator import selection_score
from stacktrain.train.study.manifest import read_manifest

SELECTION = "selection.json"
# Keys of a run's config that belong to the run, not to the configuration a next phase inherits.
RUN_KEYS = (("data", "fold"), ("train", "out_dir"), ("train", "run_name"))


def run_key(results: Any, level: str) -> tuple[float, float, float]:
    """(selection score, stack ROC-AUC, -val loss) of one run's best epoch."""
    best = results.best
    metrics = best["patch_metrics" if level == "patch" else "volume_metrics"]
    auc = best["volume_metrics"].get("roc_auc")
    return selection_score(metrics), np.nan if auc is None else float(auc), -float(best["val_loss"])


def label_key(runs: list[Any], level: str) -> tuple[float, float, float]:
    """The mean of `run_key` over a label's runs; NaN AUCs left out (-1 when all are NaN)."""
    keys = np.array([run_key(r.results, level) for r in runs], np.float64)
    auc = keys[:, 1][~np.isnan(keys[:, 1])]
    return float(keys[:, 0].mean()), float(auc.mean()) if auc.size else -1.0, float(keys[:, 2].mean())


def ranking(groups: dict[str, dict[Any, Any]], level: str) -> list[tuple[str, tuple[float, float, float]]]:
    """Labels best first, by `label_key`; equal keys keep the study's order (deterministic)."""
    keyed = [(label, label_key(list(runs.values()), level)) for label, runs in groups.items()]
    order = sorted(range(len(keyed)), key=lambda i: tuple(-v for v in keyed[i][1]) + (i,))
    return [keyed[i] for i in order]


def read_selection(study_dir: Path, where: str) -> dict[str, Any]:
    path = Path(study_dir) / SELECTION
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"{where}: {study_dir} has no {SELECTION}: that study has not finished; run "
                         f"`stacktrain study ... --out {study_dir}` to the end first") from None


def parent_base(study_dir: Path, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base raw config, parent record) for a study whose base is the finished study in `study_dir`."""
    manifest = read_manifest(study_dir)
    selection = read_selection(study_dir, where)
    parent = {"dir": str(Path(study_dir).resolve()), "name": manifest["name"], "selected": selection["label"],
              "variant": selection["variant"], "model": selection["model"], "score": selection["score"],
              "level": selection["level"], "split_sha256": manifest["split_sha256"],
              "chain": manifest.get("chain", [])}
    return anchor_paths(json.loads(json.dumps(selection["config"])), PATH_KEYS, Path(study_dir)), parent


def chain_of(parent: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The phases before this study, first first: the parent's chain, then the parent."""
    if parent is None:
        return []
    return [*parent["chain"], {k: v for k, v in parent.items() if k != "chain"}]


def check_chain_split(parent: dict[str, Any] | None, digest: str, split_file: Path) -> None:
    if parent is not None and parent["split_sha256"] != digest:
        raise StudyError(f"{split_file} (sha256 {digest[:12]}) is not the split of the base study {parent['dir']} "
                         f"(sha256 {parent['split_sha256'][:12]}); phases chain on one split file: use that one")
