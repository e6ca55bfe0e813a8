"""`stacktrain study STUDY.toml --out DIR [--workers N]`: every run of a study, resumable.

```
DIR/
  study.json           what was asked: name, kind (grid or hpo), axes, baseline, split hash, chain of phases
  study.toml           a copy of the study file
  split.json           the split every run reads (copied once; a changed split file is refused)
  runs/<variant>--<model>--fold<k>[--seed<s>]/  (grid)   training_results.json, checkpoints, study_run.json
  trials/trial-<n>/fold<k>/              (hpo)    the same per trial, plus optuna.db
  selection.json       the selected label and its config (selection.py), when every run has finished
  final.json           `--final`: the selected label's fold models on the held-out test part (final.py)
```

Resume: a run whose results have a stop reason is skipped; one with a checkpoint resumes from it
(`train(resume=True)`); a run whose recorded config differs from what the study file now gives is
refused (change --out, or delete that run). `study_run.json` records the resolved config and split hash.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from rich.console import Console

from stacktrain import ui
from stacktrain.io import atomic_write_bytes, atomic_write_json, hold_dir
from stacktrain.train.config import config_to_dict
from stacktrain.train.split import check_split, load_split, split_hash
from stacktrain.train.study import hpo
from stacktrain.train.study.config import Study, StudyError, load_study
from stacktrain.train.study.final import run_final
from stacktrain.train.study.manifest import FORMAT_VERSION, MANIFEST, read_manifest  # noqa: F401 (re-export)
from stacktrain.train.study.report import write_selection
from stacktrain.train.study.runs import (
    DEFAULT_TRAINER,
    pool_settings,
    rate,
    run_progress,
    run_record,
    run_state,
    train_one,
    worker_setup,
)
from stacktrain.train.study.selection import chain_of, check_chain_split

SPLIT_COPY = "split.json"


# -- the study directory ---------------------------------------------------------------------------
def prepare_split(study: Study, out: Path) -> tuple[Path, dict[str, Any]]:
    """Copy the split file into DIR once; later runs of the study must find the same folds in it."""
    split = load_split(study.split_file)
    digest = split_hash(split.get("folds") or [])
    if split.get("sha256", digest) != digest:
        raise StudyError(f"{study.split_file}: its folds do not match its recorded sha256 (the file was "
                         "edited); regenerate it with `stacktrain split`")
    check_chain_split(study.parent, digest, study.split_file)
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
                "descriptions": {name: spec.description for name, spec in study.variants.items()
                                 if spec.description},
                "split_file": str(study.split_file), "split_sha256": split["sha256"],
                "seeds": list(study.seeds), "chain": chain_of(study.parent), **extra}
    atomic_write_json(out / MANIFEST, manifest)
    if study.path.resolve() != (out / "study.toml").resolve():
        atomic_write_bytes(out / "study.toml", study.path.read_bytes())


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
                progress.update(bar, advance=1, rate=rate(done, started))
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
                            progress.update(bar, advance=1, rate=rate(done, started))
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
              trials: int | None = None, trainer: str = DEFAULT_TRAINER, final: bool = False,
              console: Console | None = None) -> Path:
    """Run (or resume) every run of the study into `out`, record its selection; with `final`, then
    evaluate the selected configuration on the held-out test part, once (final.py). Returns `out`."""
    console = console or ui.console()
    if workers < 1:
        raise StudyError(f"--workers {workers}: give 1 or more")
    study = load_study(study_path, overrides)
    out = Path(out)
    with hold_dir(out, "study", _busy):  # one process runs a study directory; it clears a killed one's temp files
        _run_held(study, out, workers=workers, trials=trials, trainer=trainer, final=final, console=console)
    return out


def _busy(out: Path) -> str:
    return (f"{out}: another `stacktrain study` is running in this study directory (it holds {out}/.lock); wait "
            "for it to finish, or give another --out")


def _run_held(study: Study, out: Path, *, workers: int, trials: int | None, trainer: str, final: bool,
              console: Console) -> None:
    split_copy, split = prepare_split(study, out)
    if study.hpo is not None:
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
    selection = write_selection(out)
    console.print(f"study {study.name} complete in {out}: selected {selection['label']} ({selection['level']}-level "
                  f"score {selection['score']:.3f}); next: stacktrain report {out}", highlight=False)
    if final:
        run_final(out, console=console)
