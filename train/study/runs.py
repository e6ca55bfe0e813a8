"""One run of a study: its record (config, split hash, host), its state (done, resume, new), and the
worker process that trains it. Shared by the grid (`runner`) and the search (`hpo`)."""

from __future__ import annotations

import importlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

from stacktrain import ui
from stacktrain.config import anchor_paths, relative_paths
from stacktrain.io import atomic_write_json, remove_stale_temps
from stacktrain.train.checkpoint import LAST
from stacktrain.train.config import PATH_KEYS, config_from_dict, config_to_dict
from stacktrain.train.results import RESULTS_NAME, load_results
from stacktrain.train.study.claims import Claim
from stacktrain.train.study.config import RunSpec, Study, StudyError
from stacktrain.train.study.hparams import record_hparams
from stacktrain.train.study.manifest import FORMAT_VERSION

RUN_RECORD = "study_run.json"
DEFAULT_TRAINER = "stacktrain.train.loop:train"
# Paths that depend on where DIR lives, not on what is trained: a moved study still resumes.
LOCATION_KEYS = (("data", "split"), ("train", "out_dir"))


def load_trainer(path: str) -> Callable[..., Path]:
    """`module:function` -> the function: worker processes import the trainer by name."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _strip_location(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = json.loads(json.dumps(cfg))
    for section, key in LOCATION_KEYS:
        cfg.get(section, {}).pop(key, None)
    return cfg


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`section.key: old -> new` for every setting that differs (location keys ignored)."""
    old, new = _strip_location(old), _strip_location(new)
    return [f"{s}.{k}: {old.get(s, {}).get(k)!r} -> {new.get(s, {}).get(k)!r}"
            for s in sorted(set(old) | set(new))
            for k in sorted(set(old.get(s, {})) | set(new.get(s, {})))
            if old.get(s, {}).get(k) != new.get(s, {}).get(k)]


def run_record(spec: RunSpec, study: Study, split: dict[str, Any]) -> dict[str, Any]:
    """The run's study_run.json; its config's paths relative to the run directory (`record_config`
    reads them back), so a study directory mounted elsewhere, or moved with its store, still reads."""
    config = relative_paths(config_to_dict(spec.config), PATH_KEYS, spec.run_dir)
    return {"format_version": FORMAT_VERSION, "study": study.name, "label": spec.label,
            "variant": spec.variant, "model": spec.model, "fold": spec.fold, "seed": spec.seed,
            "trial": spec.trial,
            "split_file": str(study.split_file), "split_sha256": split["sha256"],
            "config": config, "host": socket.gethostname()}


def record_config(record: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A run record's config with its paths absolute again (a copy)."""
    return anchor_paths(json.loads(json.dumps(record["config"])), PATH_KEYS, Path(run_dir))


def check_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Refuse a run directory made with another config or split (reads only)."""
    path = run_dir / RUN_RECORD
    if path.exists():
        old = json.loads(path.read_text())
        diffs = config_differences(old["config"], record["config"])
        if diffs or old.get("split_sha256") != record["split_sha256"]:
            what = "; ".join(diffs[:5]) or "the split file"
            raise StudyError(f"{run_dir}: this run was made with another config ({what}); the study "
                             "file changed since: use a new --out directory, or delete this run to redo it")


def peek_state(run_dir: Path) -> str:
    """"done", "resume" or "new", reading only (another process may be training it)."""
    results = run_dir / RESULTS_NAME
    if results.exists() and load_results(results, samples="none").get("stop_reason"):
        return "done"
    return "resume" if (run_dir / LAST).exists() else "new"


def claimed_state(run_dir: Path, record: dict[str, Any]) -> str:
    """The state of a run this process now trains (it holds the run's claim, or the trial): writes the
    run record; a run killed inside its first epoch, before last.pt, starts afresh."""
    check_record(run_dir, record)
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(run_dir)  # a killed holder's; this process holds the run, no other writer is live
    atomic_write_json(run_dir / RUN_RECORD, record)
    state = peek_state(run_dir)
    if state == "new":
        (run_dir / RESULTS_NAME).unlink(missing_ok=True)
    return state


def run_state(spec: RunSpec, record: dict[str, Any]) -> str:
    """"done", "resume" or "new" of a run this process trains; writes the run record, refusing a run
    made with another config."""
    return claimed_state(spec.run_dir, record)


# -- running ---------------------------------------------------------------------------------------
def visible_gpus() -> list[str]:
    """The GPUs this process may use (CUDA_VISIBLE_DEVICES, else all): workers are spread over them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    import torch
    return [str(i) for i in range(torch.cuda.device_count())]


def worker_setup(threads: int, gpus: list[str], index: Any) -> None:
    """In a fresh worker process: its share of the cores, and one GPU (round robin), before torch starts."""
    if hasattr(index, "get_lock"):  # a shared counter: the pool's workers number themselves
        with index.get_lock():
            index.value += 1
            index = index.value - 1
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)


def pool_settings(workers: int) -> tuple[int, list[str]]:
    return max(1, (os.cpu_count() or 1) // workers), visible_gpus()


def train_one(trainer: str, config: dict[str, Any], run_dir: str, record: dict[str, Any], beat_s: float) -> str:
    """One grid run in this process (a worker's task), under its claim (claims.py): "trained", "done"
    (another process finished it), or "taken" (another live process holds it)."""
    with Claim(Path(run_dir), beat_s) as claim:
        if not claim.held:
            return "taken"
        state = claimed_state(Path(run_dir), record)
        if state != "done":
            cfg = config_from_dict(config, f"{run_dir}/{RUN_RECORD}")
            load_trainer(trainer)(cfg, run_dir=Path(run_dir), resume=state == "resume")
        record_hparams(Path(run_dir), record)
    return "trained" if state != "done" else "done"


def run_progress(console: Console) -> Progress:
    return ui.count_bar("rate", con=console)


def rate(done: int, started: float) -> str:
    hours = (time.monotonic() - started) / 3600
    return f"{done / hours:.1f} runs/h" if done and hours > 0 else ""
