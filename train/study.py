"""`stacktrain study STUDY.toml --out DIR [--workers N]`: every run of a study, resumable.

```
DIR/
  study.json           what was asked: name, kind (grid or hpo), axes, baseline, split hash
  study.toml           a copy of the study file
  split.json           the split every run reads (copied once; a changed split file is refused)
  runs/<variant>--<model>--fold<k>/      (grid)   training_results.json, checkpoints, study_run.json
  trials/trial-<n>/fold<k>/              (hpo)    the same per trial, plus optuna.db
```

Resume: a run whose results have a stop reason is skipped; one with a checkpoint resumes from it
(`train(resume=True)`); a run whose recorded config differs from what the study file now gives is
refused (change --out, or delete that run). `study_run.json` records the resolved config and split hash.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from stores.layout import atomic_write_json
from train.config import config_to_dict
from train.results import RESULTS_NAME
from train.split import check_split, load_split, split_hash
from train.study_config import RunSpec, Study, StudyError, load_study

FORMAT_VERSION = 1
MANIFEST = "study.json"
RUN_RECORD = "study_run.json"
SPLIT_COPY = "split.json"
DEFAULT_TRAINER = "train.loop:train"
# Paths that depend on where DIR lives, not on what is trained: a moved study still resumes.
LOCATION_KEYS = (("data", "split"), ("train", "out_dir"))


def load_trainer(path: str) -> Callable[..., Path]:
    """`module:function` -> the function: worker processes import the trainer by name."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# -- the study directory ---------------------------------------------------------------------------
def prepare_split(study: Study, out: Path) -> tuple[Path, dict[str, Any]]:
    """Copy the split file into DIR once; later runs of the study must find the same folds in it."""
    split = load_split(study.split_file)
    digest = split_hash(split.get("folds") or [])
    if split.get("sha256", digest) != digest:
        raise StudyError(f"{study.split_file}: its folds do not match its recorded sha256 (the file was "
                         "edited); regenerate it with `stacktrain split`")
    copy = out / SPLIT_COPY
    if copy.exists():
        kept = load_split(copy)
        if kept.get("sha256") != digest:
            raise StudyError(f"{study.split_file} (sha256 {digest[:12]}) is not the split this study started "
                             f"with ({copy}, sha256 {str(kept.get('sha256'))[:12]}); all runs of a study use "
                             "one split: restore the file or start a new --out directory")
    else:
        atomic_write_json(copy, {**split, "sha256": digest})
    return copy, {**split, "sha256": digest}


def write_manifest(study: Study, out: Path, split: dict[str, Any], kind: str, extra: dict[str, Any]) -> None:
    manifest = {"format_version": FORMAT_VERSION, "name": study.name, "kind": kind,
                "study_file": str(study.path.resolve()), "baseline": study.baseline,
                "variants": list(study.variants), "models": list(study.models), "folds": list(study.folds),
                "descriptions": {name: spec["description"] for name, spec in study.variants.items()
                                 if spec.get("description")},
                "split_file": str(study.split_file), "split_sha256": split["sha256"], **extra}
    atomic_write_json(out / MANIFEST, manifest)
    if study.path.resolve() != (out / "study.toml").resolve():
        shutil.copyfile(study.path, out / "study.toml")


def read_manifest(out: str | Path) -> dict[str, Any]:
    path = Path(out) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"{path}: not a study directory (no {MANIFEST}); run `stacktrain study STUDY.toml "
                         f"--out {out}` first") from None
    except json.JSONDecodeError as e:
        raise StudyError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise StudyError(f"{path}: study format {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    return manifest


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
    return {"format_version": FORMAT_VERSION, "study": study.name, "label": spec.label,
            "variant": spec.variant, "model": spec.model, "fold": spec.fold, "trial": spec.trial,
            "split_file": str(study.split_file), "split_sha256": split["sha256"],
            "config": config_to_dict(spec.config), "host": socket.gethostname()}


def run_state(spec: RunSpec, record: dict[str, Any]) -> str:
    """"done", "resume" or "new"; writes the run record, refusing a run made with another config."""
    path = spec.run_dir / RUN_RECORD
    if path.exists():
        old = json.loads(path.read_text())
        diffs = config_differences(old["config"], record["config"])
        if diffs or old.get("split_sha256") != record["split_sha256"]:
            what = "; ".join(diffs[:5]) or "the split file"
            raise StudyError(f"{spec.run_dir}: this run was made with another config ({what}); the study "
                             "file changed since: use a new --out directory, or delete this run to redo it")
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    results = spec.run_dir / RESULTS_NAME
    if results.exists() and json.loads(results.read_text()).get("stop_reason"):
        return "done"
    from train.checkpoint import LAST  # (torch: imported when a study runs, not for `stacktrain --help`)
    if (spec.run_dir / LAST).exists():
        return "resume"
    results.unlink(missing_ok=True)  # killed inside its first epoch, before last.pt: start it afresh
    return "new"


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


def train_one(trainer: str, config: dict[str, Any], run_dir: str, resume: bool) -> str:
    """One training in this process (a worker's task): the study's config, run directory and resume."""
    from train.config import config_from_dict
    cfg = config_from_dict(config, f"{run_dir}/{RUN_RECORD}")
    load_trainer(trainer)(cfg, run_dir=Path(run_dir), resume=resume)
    return run_dir


def run_progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[rate]}"), console=console)


def _rate(done: int, started: float) -> str:
    hours = (time.monotonic() - started) / 3600
    return f"{done / hours:.1f} runs/h" if done and hours > 0 else ""


def run_grid(study: Study, out: Path, split_copy: Path, split: dict[str, Any], *, workers: int,
             trainer: str, console: Console) -> dict[str, int]:
    specs = study.runs(out, split_copy)
    states = {spec.run_dir: run_state(spec, run_record(spec, study, split)) for spec in specs}
    todo = [s for s in specs if states[s.run_dir] != "done"]
    counts = {k: sum(v == k for v in states.values()) for k in ("done", "resume", "new")}
    console.print(f"study {study.name}: {len(specs)} runs ({counts['done']} finished, {counts['resume']} "
                  f"to resume, {counts['new']} to start), {workers} worker(s)")
    tasks = [(trainer, config_to_dict(s.config), str(s.run_dir), states[s.run_dir] == "resume") for s in todo]
    started, done = time.monotonic(), 0
    with run_progress(console) as progress:
        bar = progress.add_task("runs", total=len(tasks), rate="")
        if workers == 1:
            for task in tasks:
                train_one(*task)
                done += 1
                progress.update(bar, advance=1, rate=_rate(done, started))
        elif tasks:
            ctx = get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=worker_setup,
                                     initargs=(*pool_settings(workers), ctx.Value("i", 0))) as pool:
                pending = {pool.submit(train_one, *task) for task in tasks}
                try:
                    while pending:
                        finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                        for future in finished:
                            future.result()
                            done += 1
                            progress.update(bar, advance=1, rate=_rate(done, started))
                except BaseException:  # runs in flight finish (they resume later); the others never start
                    pool.shutdown(cancel_futures=True)
                    raise
    return counts


def check_stores(study: Study, split: dict[str, Any], configs: list[Any]) -> None:
    """Every store the runs read must hold the split's stacks (checked before any training)."""
    for store in sorted({cfg.data.store for cfg in configs}):
        if not store:
            raise StudyError(f"{study.path}: no store: set data.store in the base config or study.store")
        check_split(split, store, where=str(study.split_file))


def run_study(study_path: str | Path, out: str | Path, *, workers: int = 1, overrides: list[str] = (),
              trials: int | None = None, trainer: str = DEFAULT_TRAINER,
              console: Console | None = None) -> Path:
    """Run (or resume) every run of the study into `out`; returns `out`."""
    console = console or Console()
    if workers < 1:
        raise StudyError(f"--workers {workers}: give 1 or more")
    study = load_study(study_path, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split_copy, split = prepare_split(study, out)
    if study.hpo is not None:
        from train import hpo
        space = hpo.load_space(study)
        check_stores(study, split, [hpo.trial_config(study, space, {}, out, split_copy, 0, study.folds[0])])
        write_manifest(study, out, split, "hpo", {"hpo": hpo.manifest_entry(study, space, out)})
        hpo.run_hpo(study, space, out, split_copy, split, workers=workers, trials=trials, trainer=trainer,
                    console=console)
    else:
        if trials is not None:
            raise StudyError(f"--trials {trials}: only a study with an [hpo] table runs trials; {study.path} "
                             "has none")
        check_stores(study, split, [s.config for s in study.runs(out, split_copy)])
        write_manifest(study, out, split, "grid", {})
        run_grid(study, out, split_copy, split, workers=workers, trainer=trainer, console=console)
    console.print(f"study {study.name} complete in {out}; next: stacktrain report {out}")
    return out


# -- CLI -------------------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    run_study(args.study, args.out, workers=args.workers, overrides=args.set, trials=args.trials)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "study", help="run every (variant, model, fold) of a study file, or its Optuna search; resumable",
        description="Run a study: preprocessing variants x models x folds (phases 1-2), or an Optuna "
                    "search when the file has an [hpo] table (phase 3). Rerun the same command to resume.")
    p.add_argument("study", help="the study file (train/studies/*.toml)")
    p.add_argument("--out", required=True, help="study directory (created; rerun with it to resume)")
    p.add_argument("--workers", type=int, default=1, help="trainings in parallel processes (default 1)")
    p.add_argument("--trials", type=int, default=None, help="phase 3: total trials (default: hpo.trials)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override for every run, after the study file's own (repeatable)")
    p.set_defaults(func=_run)
