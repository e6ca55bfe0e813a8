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

from stacktrain import signals, ui
from stacktrain.io import atomic_write_bytes, atomic_write_json, make_dir, remove_stale_temps
from stacktrain.train.config import config_to_dict
from stacktrain.train.preflight import preflight
from stacktrain.train.split import check_split, load_split, split_hash, write_split
from stacktrain.train.study import claims, hpo
from stacktrain.train.study.config import Study, StudyError, load_study
from stacktrain.train.study.final import run_final
from stacktrain.train.study.manifest import FORMAT_VERSION, MANIFEST, read_manifest  # noqa: F401 (re-export)
from stacktrain.train.study.report import write_selection
from stacktrain.train.study.runs import (
    DEFAULT_TRAINER,
    check_record,
    peek_state,
    pool_settings,
    rate,
    run_progress,
    run_record,
    train_one,
    worker_setup,
)
from stacktrain.train.study.selection import chain_of, check_chain_split
from stacktrain.train.study.storage import redact_text

SPLIT_COPY = "split.json"
STALE_TEMP_S = 600.0  # far longer than any one atomic write of a study file


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
        write_split({**split, "sha256": digest}, copy)
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
        text = redact_text(study.path.read_text())  # never a password in a file we write
        atomic_write_bytes(out / "study.toml", text.encode())


def run_grid(study: Study, out: Path, split_copy: Path, split: dict[str, Any], *, workers: int,
             trainer: str, console: Console) -> dict[str, int]:
    """Train every run not yet done. Runs are claimed (claims.py), so other processes pointed at the same
    DIR (other machines) share the grid: each run is trained once, and this process waits for the runs
    others hold, taking over any whose holder died."""
    specs = study.runs(out, split_copy)
    records = {spec.run_dir: run_record(spec, study, split) for spec in specs}
    for spec in specs:  # refuse a changed study before training anything
        check_record(spec.run_dir, records[spec.run_dir])
        if spec.run_dir.is_dir():
            remove_stale_temps(spec.run_dir, older_than_s=STALE_TEMP_S)
    states = {spec.run_dir: peek_state(spec.run_dir) for spec in specs}
    counts = {k: sum(v == k for v in states.values()) for k in ("done", "resume", "new")}
    console.print(f"study {study.name}: {len(specs)} runs ({counts['done']} finished, {counts['resume']} "
                  f"to resume, {counts['new']} to start), {workers} worker(s)")
    tasks = {s.run_dir: (trainer, config_to_dict(s.config), str(s.run_dir), records[s.run_dir], study.heartbeat_s)
             for s in specs if states[s.run_dir] != "done"}
    started, done, taken = time.monotonic(), 0, []

    def finished(run_dir: Path, outcome: str) -> None:
        nonlocal done
        if outcome == "taken":
            taken.append(run_dir)
            return
        done += 1
        progress.update(bar, advance=1, rate=rate(done, started))

    with run_progress(console) as progress:
        bar = progress.add_task("runs", total=len(tasks), rate="")
        if workers == 1:
            for run_dir, task in tasks.items():
                finished(run_dir, train_one(*task))
        elif tasks:
            ctx = get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(*pool_settings(workers), ctx.Value("i", 0))) as pool:
                pending = {pool.submit(_train_in_worker, *task): run_dir for run_dir, task in tasks.items()}
                try:
                    while pending:
                        ready, _ = wait(pending, return_when=FIRST_EXCEPTION)
                        for future in ready:
                            finished(pending.pop(future), future.result())
                except KeyboardInterrupt:  # Ctrl-C, SIGTERM: runs in flight stop now, release their claims
                    signals.stop_pool(pool, grace_s=signals.UNWIND_GRACE_S)
                    raise
                except BaseException:  # runs in flight finish (they resume later); the others never start
                    pool.shutdown(cancel_futures=True)
                    raise
        if taken:
            holders = sorted({claims.describe(h) for d in taken if (h := claims.holder(d))})
            console.print(f"{len(taken)} run(s) are trained by other processes ({', '.join(holders[:4])}); waiting "
                          f"for them (one silent for {claims.STALE_BEATS * study.heartbeat_s:g} s is taken over)")
            _wait_for_others(taken, tasks, study.heartbeat_s, finished)
    return counts


def _worker_init(*setup) -> None:
    signals.stop_on_parent_term()  # the parent relays Ctrl-C as SIGTERM (run_grid); idle workers just end
    worker_setup(*setup)


def _train_in_worker(*task) -> str:
    with signals.unwinding():  # SIGTERM unwinds the training: last epoch's files kept, claim released
        return train_one(*task)


def _wait_for_others(taken: list[Path], tasks: dict[Path, tuple], beat_s: float, finished) -> None:
    """Until every run held by another process is done: train here any whose claim was released
    unfinished or went stale. Polls once a beat: a claim changes no faster."""
    pending = list(taken)
    while pending:
        for run_dir in list(pending):
            info = claims.holder(run_dir)
            if peek_state(run_dir) == "done" and info is None:
                pending.remove(run_dir)
                finished(run_dir, "done")
            elif info is None or claims.is_stale(info, beat_s):
                outcome = train_one(*tasks[run_dir])
                if outcome != "taken":
                    pending.remove(run_dir)
                    finished(run_dir, outcome)
        if pending:
            time.sleep(min(beat_s, 2.0))


def print_runs(study: Study, out: Path, split_copy: Path, console: Console) -> None:
    """`--print-runs`: one line per run (index, state, holder, run directory), for a scheduler to size an
    array of processes that all run the same `stacktrain study` command."""
    if study.hpo is not None:
        console.print(f"search {study.name}: {study.hpo.trials} trials over folds {list(hpo.trial_folds(study))}; "
                      "start any number of processes with the same command and storage", highlight=False)
        return
    for i, spec in enumerate(study.runs(out, split_copy)):
        info = claims.holder(spec.run_dir)
        who = claims.describe(info) if info else "-"
        print(f"{i}\t{peek_state(spec.run_dir)}\t{who}\t{spec.run_dir}")  # plain tabs, for scripts


def check_stores(study: Study, split: dict[str, Any], configs: list[Any]) -> None:
    """Every store the runs read must hold the split's stacks, and this machine must be able to run every
    distinct model, patch, batch, device, precision and loader of the runs (checked before any training)."""
    seen = set()
    for cfg in configs:
        key = (cfg.model.name, cfg.model.tiny, repr(cfg.model.options), cfg.patch.size, cfg.loader.batch_size,
               cfg.loader.loader, cfg.train.device, cfg.train.precision, cfg.train.memory_check)
        if key not in seen:
            seen.add(key)
            preflight(cfg)
    for store in sorted({cfg.data.store for cfg in configs}):
        if not store:
            raise StudyError(f"{study.path}: no store: set data.store in the base config or study.store")
        check_split(split, store, where=str(study.split_file))


def run_study(study_path: str | Path, out: str | Path, *, workers: int = 1, overrides: list[str] = (),
              trials: int | None = None, trainer: str = DEFAULT_TRAINER, final: bool = False,
              storage: str | None = None, print_only: bool = False, console: Console | None = None) -> Path:
    """Run (or resume) every run of the study into `out`, record its selection; with `final`, then
    evaluate the selected configuration on the held-out test part, once (final.py). Returns `out`."""
    console = console or ui.console()
    if workers < 1:
        raise StudyError(f"--workers {workers}: give 1 or more")
    study = load_study(study_path, overrides)
    out = Path(out)
    if study.hpo is not None:
        study = hpo.with_storage(study, out, storage)
    elif storage is not None:
        raise StudyError(f"--storage: only a study with an [hpo] table uses an Optuna storage; {study.path} has none")
    make_dir(out, "study")
    # Shared by every process (machine) running this study: no lock on the folder; temp files of atomic writes
    # that a killed process left are removed once old enough that no live writer can own them.
    remove_stale_temps(out, older_than_s=STALE_TEMP_S)
    split_copy, split = prepare_split(study, out)
    if print_only:
        print_runs(study, out, split_copy, console)
        return out
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
    selection = write_selection(out, study.hpo.storage if study.hpo is not None else None)
    console.print(f"study {study.name} complete in {out}: selected {selection['label']} ({selection['level']}-level "
                  f"score {selection['score']:.3f}); next: stacktrain report {out}", highlight=False)
    if final:
        run_final(out, console=console)
    return out
