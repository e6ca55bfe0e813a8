"""The finished runs of a study, read back from their folders (and a search's trials from its storage):
what `stacktrain report` compares. Each run's results are read lazily down to its best epoch's samples."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from stacktrain.stores.reader import Store
from stacktrain.train.results import RESULTS_NAME, RunResults, load_results
from stacktrain.train.study.config import StudyError
from stacktrain.train.study.manifest import read_manifest
from stacktrain.train.study.runs import RUN_RECORD, record_config
from stacktrain.train.study.stats import FoldPredictions, fold_predictions, json_metrics
from stacktrain.train.study.storage import listed_trials as hpo_trials

_PATIENTS: dict[str, dict[str, str]] = {}


def patients(store: str) -> dict[str, str]:
    """Stack id -> patient (group) of a store, read once per report."""
    if store not in _PATIENTS:
        _PATIENTS[store] = {m.stack_id: m.group for m in Store(store).stacks}
    return _PATIENTS[store]


@dataclasses.dataclass
class Run:
    label: str
    fold: int
    run_dir: Path
    record: dict[str, Any]
    results: RunResults
    seed: int | None = None

    @property
    def best(self) -> dict[str, Any]:
        return self.results.best

    def predictions(self) -> FoldPredictions:
        store = record_config(self.record, self.run_dir)["data"]["store"]
        return fold_predictions(self.best, self.fold, patients(store) if store and Path(store).exists() else None)

    @property
    def steps_per_epoch(self) -> float | None:
        steps = [e["throughput"].get("optimizer_steps") for e in self.results["epochs"]]
        return float(np.median(steps)) if steps and None not in steps else None

    def metrics(self, level: str) -> dict[str, float]:
        return json_metrics(self.results.metrics(level))

    @property
    def throughput(self) -> float:
        return statistics.median(e["throughput"]["train_patches_per_s"] for e in self.results["epochs"])


def load_runs(study_dir: Path, samples: str = "best", storage: str | None = None
              ) -> tuple[dict[str, Any], dict[str, dict[tuple, Run]], list[str]]:
    """The manifest, finished runs by label then (fold, seed) (in study order), and notes on the rest.
    A search's trials are listed from its storage (`storage`: the URL when the recorded one was redacted).
    Only the best epoch's samples are read (`samples`), so a report over many runs stays small."""
    manifest = read_manifest(study_dir)
    records = [json.loads(p.read_text()) | {"_dir": p.parent} for p in
               [*study_dir.glob(f"runs/*/{RUN_RECORD}"), *study_dir.glob(f"trials/*/*/{RUN_RECORD}")]]
    order = {name: i for i, name in enumerate(manifest["variants"] + manifest["models"])}
    records.sort(key=lambda r: (r["trial"] if r["trial"] is not None else -1, order.get(r["variant"], 0),
                                order.get(r["model"], 0), r["fold"], r.get("seed") or -1))
    groups: dict[str, dict[tuple, Run]] = {}
    unfinished, pruned = [], 0
    for rec in records:
        path = rec["_dir"] / RESULTS_NAME
        results = load_results(path, samples=samples) if path.exists() else None
        if results is None or results["stop_reason"] is None or results["best_epoch"] is None:
            unfinished.append(rec["_dir"].relative_to(study_dir).as_posix())
            continue
        if results["stop_reason"] == "pruned":
            pruned += 1
            continue
        key = (rec["fold"], rec.get("seed"))
        groups.setdefault(rec["label"], {})[key] = Run(rec["label"], rec["fold"], rec["_dir"], rec, results,
                                                       rec.get("seed"))
    notes = []
    if unfinished:
        notes.append(f"{len(unfinished)} run(s) unfinished and left out ({', '.join(unfinished[:4])}"
                     f"{', ...' if len(unfinished) > 4 else ''}); rerun `stacktrain study` to finish them")
    if pruned:
        notes.append(f"{pruned} pruned trial run(s) left out of the table (they stopped early)")
    if manifest["kind"] == "hpo":  # trials whose folds are not all finished are not comparable
        manifest["hpo"]["storage"], listed, manifest["baseline"] = hpo_trials(manifest, study_dir, storage)
        want = len(manifest["hpo"]["folds"])
        groups = {k: v for k, v in groups.items() if len(v) == want}
        away = [label for label, t in listed.items() if t.state.name == "COMPLETE" and label not in groups]
        if away:
            notes.append(f"{len(away)} trial(s) finished in the storage but have no finished runs under {study_dir}"
                         f"/trials ({', '.join(away[:6])}{', ...' if len(away) > 6 else ''}): trained on another "
                         "machine? keep the study directory on a filesystem every machine shares")
    if not groups:
        raise StudyError(f"{study_dir}: no finished run to report; run `stacktrain study ... --out "
                         f"{study_dir}` first (or let it finish)")
    return manifest, groups, notes


