"""The final step: the selected configuration on the held-out test part, evaluated once.

`stacktrain study STUDY --out DIR --final` (after the study has finished and recorded its selection)
takes the selected label's runs (one per fold, and per seed), loads each run's best.pt (chosen on its
own validation part) and predicts the split's test part with it; the ensemble's stack probability is
the mean of the runs' stack probabilities, thresholded at the mean of the runs' thresholds (0.5, or
each tuned on its own validation part with train.threshold = "tuned"). Nothing is retrained, and
no choice (epoch, variant, threshold) looks at the test part: the test stacks are read here only.
The result is DIR/final.json; a second `--final` prints it again and evaluates nothing, so the test
part is evaluated once per study directory. The test part is the one every fold of the split shares
(`stacktrain split --folds K --test-fraction F`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from stacktrain import ui
from stacktrain.errors import StudyError
from stacktrain.io import atomic_write_json
from stacktrain.stores.reader import Store
from stacktrain.train.evaluator import binary_metrics
from stacktrain.train.predict import predict
from stacktrain.train.split import load_split
from stacktrain.train.study.runs import RUN_RECORD, record_config
from stacktrain.train.study.selection import read_selection

FINAL = "final.json"
METHOD = ("ensemble of the selected label's runs: each run's best.pt (selected on its own validation part) "
          "predicts the test stacks; stack probability = mean over the runs; MALADE when >= the mean of the "
          "runs' thresholds (0.5 unless train.threshold = tuned, then each tuned on its validation part)")


def evaluate_checkpoint(checkpoint: Path, store: str, stacks: list[str], config: dict[str, Any],
                        out: Path) -> tuple[dict[str, float], float]:
    """(stack id -> aggregated probability, the checkpoint's threshold) of one checkpoint on `stacks`
    (stacktrain.train.predict)."""
    result = predict(checkpoint, store, out, stacks=stacks, loader=config["loader"]["loader"],
                     device=config["train"]["device"], console=Console(quiet=True))
    return {v["stack_id"]: float(v["aggregated_probability"]) for v in result["stacks"]}, result["threshold"]


def test_part(split: dict[str, Any], where: str) -> list[str]:
    parts = [sorted(f.get("test", [])) for f in split["folds"]]
    if not parts[0]:
        raise StudyError(f"{where}: the split has no test part, so there is nothing to evaluate once; make the "
                         "split with `stacktrain split STORE --folds K --test-fraction 0.2` before the study")
    if any(p != parts[0] for p in parts):
        raise StudyError(f"{where}: the folds of the split hold different test parts; regenerate it with "
                         "`stacktrain split`")
    return parts[0]


def run_final(study_dir: str | Path, *, evaluate: Callable[..., dict[str, float]] = evaluate_checkpoint,
              console: Console | None = None) -> dict[str, Any]:
    console = console or ui.console()
    study_dir = Path(study_dir)
    path = study_dir / FINAL
    if path.exists():
        final = json.loads(path.read_text())
        console.print(f"{path}: the test part was evaluated already (once is the rule); test F1 MALADE "
                      f"{final['volume_metrics']['f1']['MALADE']:.3f}, not evaluated again", highlight=False)
        return final
    selection = read_selection(study_dir, str(study_dir))
    test = test_part(load_split(study_dir / "split.json"), str(study_dir / "split.json"))
    per_run, probs, thresholds = [], [], []
    for rel in selection["runs"]:
        run_dir = study_dir / rel
        config = record_config(json.loads((run_dir / RUN_RECORD).read_text()), run_dir)
        store = config["data"]["store"]
        got, threshold = evaluate(run_dir / "best.pt", store, test, config, study_dir / "final" / Path(rel).name)
        probs.append([got[s] for s in test])
        thresholds.append(threshold)
        per_run.append({"run": rel, "threshold": threshold, "probabilities": dict(zip(test, probs[-1]))})
    st = Store(store)
    labels = np.array([st.meta(s).label_index for s in test])
    mean = np.mean(np.array(probs), axis=0)
    threshold = float(np.mean(thresholds))
    for entry, p in zip(per_run, probs):
        entry["volume_metrics"] = binary_metrics(labels, np.array(p), entry["threshold"])
    final = {"label": selection["label"], "method": METHOD, "runs": selection["runs"], "level": "stack",
             "n_stacks": len(test), "n_patients": len({st.meta(s).group for s in test}),
             "threshold": threshold, "volume_metrics": binary_metrics(labels, mean, threshold),
             "stacks": [{"stack_id": s, "probability": float(p), "predicted_label": int(p >= threshold),
                         "label": int(y)} for s, p, y in zip(test, mean, labels)],
             "per_run": per_run}
    atomic_write_json(path, final)
    m = final["volume_metrics"]
    console.print(f"held-out test ({len(test)} stacks, {final['n_patients']} patients), {selection['label']} as an "
                  f"ensemble of {len(probs)} run(s): F1 MALADE {m['f1']['MALADE']:.3f}, balanced accuracy "
                  f"{m['balanced_accuracy']:.3f}, ROC-AUC {_num(m['roc_auc'])}; wrote {path}", highlight=False)
    return final


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"
