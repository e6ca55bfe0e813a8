"""Phase 3: an Optuna search over the study file's `[hpo]` space; TPE sampler, pruning, resumable.

```toml
[hpo]
trials = 40                 # total finished (complete + pruned) trials; a rerun tops up to this
folds = [0]                 # folds each trial trains (default: study.folds); objective = their mean
storage = ""                # default sqlite:///DIR/optuna.db; or --storage / $STACKTRAIN_STORAGE (storage.py)
seed = 0                    # TPE seed: trial n samples with (seed, n), so machines never repeat a trial
enqueue_base = true         # trial 0 = the base config's values: the baseline of the report
heartbeat_s = 0             # > 0: trials of dead machines are failed after 2 beats and retried
pruner = { kind = "median", startup_trials = 5, warmup_epochs = 5 }   # or kind = "none"
[hpo.space]
"optim.lr" = { type = "float", low = 1e-5, high = 1e-2, log = true }
"loader.batch_size" = { type = "categorical", choices = [16, 32, 64] }
```

Each trial trains its folds one after the other in `DIR/trials/trial-NNNN/foldK`. After every epoch it
reports the selection score (validation F1 of MALADE at train.select_level, stack by default; 0 for a
one-class prediction) at step `fold position * epochs + epoch`
and stops the training when the pruner says so (stop_reason "pruned"). The objective is the mean over
folds of the best epoch's score. A searched key that cannot change it (train.aggregate at patch level)
is refused. A trial whose process died (same host, pid gone; or, with heartbeat_s,
any machine) is failed and re-enqueued with its parameters; the new trial resumes its run directories.
Several processes (machines) share a search through one storage and one study directory on a shared
filesystem: storage.py says how creation, sampling and errors stay safe; the process that creates the
study enqueues the base trial (user attribute `base`), so it exists once.
The table's keys, defaults and rules are `HpoConfig` (hpo_config.py), checked when the file is read.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import socket
from pathlib import Path
from typing import Any

import tomli_w

from stacktrain import signals
from stacktrain.train.config import ConfigError, apply_override
from stacktrain.train.evaluator import selection_score
from stacktrain.train.results import RESULTS_NAME, load_results
from stacktrain.train.study import storage as storages
from stacktrain.train.study.config import RunSpec, Study, StudyError, build_config
from stacktrain.train.study.hparams import record_hparams
from stacktrain.train.study.hpo_config import SearchDimension
from stacktrain.train.study.runs import load_trainer, pool_settings, run_progress, run_record, run_state, worker_setup

TRIALS_DIR = "trials"
NO_EFFECT_AT_PATCH_LEVEL = ("train.aggregate", "train.topk")  # per-stack aggregation only
NOT_SEARCHABLE = ("train.select_level",)  # the objective's own definition


def _literal(value: Any) -> str:
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def set_param(raw: dict[str, Any], key: str, value: Any) -> None:
    """Apply one `section.key` (or `model.options.key`) = value to a raw config, checking the key."""
    apply_override(raw, f"{key}={_literal(value)}")


def load_space(study: Study) -> dict[str, SearchDimension]:
    """The `[hpo.space]` (its types and bounds were checked with the file), tried on the base config:
    every searched key must exist and every choice and bound must make a valid run config."""
    where = f"{study.path}: hpo.space"
    level = build_config(copy.deepcopy(study.base_raw), str(study.path)).train.select_level
    for key in study.hpo.space:
        inert = key in NO_EFFECT_AT_PATCH_LEVEL and level == "patch"
        if inert or key in NOT_SEARCHABLE:
            why = ("changes the scale of the objective itself" if key in NOT_SEARCHABLE
                   else "cannot change a patch-level objective")
            raise StudyError(f"{where}.{key}: {why}; the space may hold only dimensions that can change the "
                             f"objective (F1 of MALADE at train.select_level = {level!r})")
    for key, dim in study.hpo.space.items():
        for value in dim.samples():
            raw = copy.deepcopy(study.base_raw)
            try:
                set_param(raw, key, value)
            except ConfigError as e:
                raise StudyError(f"{where}.{key}: {e}") from None
            build_config(raw, f"{where}.{key} = {value!r}")
    return study.hpo.space


def suggest(trial: Any, key: str, dim: SearchDimension) -> Any:
    if dim.type == "categorical":
        return trial.suggest_categorical(key, list(dim.choices))
    if dim.type == "float":
        return trial.suggest_float(key, dim.low, dim.high, log=dim.log, step=dim.step)
    return trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))


def trial_folds(study: Study) -> tuple[int, ...]:
    """The folds every trial trains: hpo.folds, else the study's."""
    return study.hpo.folds or study.folds


def trial_config(study: Study, space: dict[str, SearchDimension], params: dict[str, Any], out: Path,
                 split_copy: Path, number: int, fold: int):
    variant, model = next(iter(study.variants)), next(iter(study.models))
    raw = study.raw_config(variant, model, fold, out, run_dir_name(number, fold), split_copy)
    for key, value in params.items():
        set_param(raw, key, value)
    return build_config(raw, f"{study.path}: trial {number} {params}")


def run_dir_name(number: int, fold: int) -> str:
    return f"{TRIALS_DIR}/trial-{number:04d}/fold{fold}"


def with_storage(study: Study, out: Path, given: str | None = None) -> Study:
    """The study with hpo.storage resolved (--storage, $STACKTRAIN_STORAGE, the file's, the default)."""
    url = storages.resolve_url(study.hpo.storage, out, given)
    return dataclasses.replace(study, hpo=dataclasses.replace(study.hpo, storage=url))


def manifest_entry(study: Study, space: dict[str, SearchDimension], out: Path) -> dict[str, Any]:
    """What `stacktrain report` needs to open the Optuna study again."""
    return {"storage": storages.redact(study.hpo.storage), "study_name": study.name,
            "space": {key: dim.as_table() for key, dim in space.items()},
            "folds": list(trial_folds(study)), "trials": study.hpo.trials}


def base_params(study: Study, space: dict[str, SearchDimension]) -> dict[str, Any] | None:
    """The base config's value of every searched key, when all lie inside the space (else None)."""
    cfg = build_config(copy.deepcopy(study.base_raw), str(study.path))
    params = {}
    for key, dim in space.items():
        value: Any = cfg
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
        if not dim.holds(value):
            return None
        params[key] = value
    return params


# -- the search ------------------------------------------------------------------------------------
def _optuna():
    return storages._optuna()


def open_study(study: Study) -> tuple[Any, bool]:
    """Create or load the Optuna study (per-trial seeded TPE, median pruner) on its (resolved) storage;
    and whether this call created it (that process alone enqueues the base trial)."""
    optuna = _optuna()
    hpo, url = study.hpo, study.hpo.storage
    storage = storages.open_storage(url, hpo.heartbeat_s)
    pruner = (optuna.pruners.NopPruner() if hpo.pruner.kind == "none" else optuna.pruners.MedianPruner(
        n_startup_trials=hpo.pruner.startup_trials, n_warmup_steps=hpo.pruner.warmup_epochs))
    sampler = storages.trial_seeded_sampler(hpo.seed)
    with storages.database_errors(url):
        try:  # the database's unique study name decides which process created it
            created = optuna.create_study(study_name=study.name, storage=storage, sampler=sampler, pruner=pruner,
                                          direction="maximize", load_if_exists=False)
            return created, True
        except optuna.exceptions.DuplicatedStudyError:
            pass
    return storages.create_or_load(study.name, storage, url, sampler, pruner), False


class SurplusTrial(Exception):
    """Raised by a sampled trial that another machine's trials already made one too many (failed, not run)."""


def _score(entry: dict[str, Any], level: str) -> float:
    """The objective per epoch: the selection score (stack F1 of MALADE by default; 0 for one-class
    predictions: evaluator.selection_score), what early stopping and best.pt select on."""
    return selection_score(entry["patch_metrics" if level == "patch" else "volume_metrics"])


class Objective:
    """Train one trial's folds; report per-epoch F1 for pruning; return the mean best F1 over folds."""

    def __init__(self, study: Study, space: dict[str, SearchDimension], out: Path, split_copy: Path,
                 split: dict[str, Any], folds: tuple[int, ...], trainer: str, target: int):
        self.study, self.space, self.out, self.split_copy = study, space, out, split_copy
        self.split, self.folds, self.trainer, self.target = split, folds, trainer, target

    def _surplus(self, trial: Any) -> bool:
        """A sampled trial (not an enqueued one: those always run) behind `target` earlier live trials:
        machines that checked the count at the same moment started one trial too many."""
        if "run_number" in trial.user_attrs or trial.user_attrs.get("base"):
            return False
        states = _optuna().trial.TrialState
        live = (states.COMPLETE, states.PRUNED, states.RUNNING)
        ahead = [t for t in trial.study.get_trials(deepcopy=False, states=live) if t.number < trial.number]
        return len(ahead) >= self.target

    def __call__(self, trial: Any) -> float:
        try:
            return self._objective(trial)
        except KeyboardInterrupt:  # Optuna fails the trial; queue it again so the rerun resumes it, as after a kill
            _optuna().logging.set_verbosity(_optuna().logging.ERROR)  # its "trial failed" warning has a traceback
            if "run_number" in trial.user_attrs:
                trial.study.enqueue_trial(trial.params, user_attrs={"run_number": trial.user_attrs["run_number"],
                                                                    "base": bool(trial.user_attrs.get("base"))})
            raise

    def _objective(self, trial: Any) -> float:
        optuna = _optuna()
        if self._surplus(trial):
            raise SurplusTrial(f"trial {trial.number}: the search already has {self.target} trials")
        number = int(trial.user_attrs.get("run_number", trial.number))  # a retried trial keeps its runs
        trial.set_user_attr("run_number", number)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("sampler_seed", storages.trial_seed(self.study.hpo.seed, trial.number))
        params = {key: suggest(trial, key, spec) for key, spec in self.space.items()}
        values = []
        for position, fold in enumerate(self.folds):
            cfg = trial_config(self.study, self.space, params, self.out, self.split_copy, number, fold)
            spec = RunSpec(label=f"trial-{number}", variant=next(iter(self.study.variants)),
                           model=next(iter(self.study.models)), fold=fold,
                           run_dir=self.out / run_dir_name(number, fold), config=cfg, trial=number)
            record = run_record(spec, self.study, self.split)
            state = run_state(spec, record)
            level, offset = cfg.train.select_level, position * cfg.train.epochs
            if state != "new":  # epochs trained before a kill (by the failed trial) count for the pruner too
                for entry in load_results(spec.run_dir / RESULTS_NAME, samples="none")["epochs"]:
                    trial.report(_score(entry, level), offset + entry["epoch"])
            if state != "done":
                def on_epoch(epoch: int, entry: dict[str, Any]) -> bool:
                    trial.report(_score(entry, level), offset + epoch)
                    return trial.should_prune()
                load_trainer(self.trainer)(cfg, run_dir=spec.run_dir, resume=state == "resume",
                                           on_epoch=on_epoch)
            record_hparams(spec.run_dir, record, params)
            results = load_results(spec.run_dir / RESULTS_NAME, samples="none")
            if results["stop_reason"] == "pruned":
                raise optuna.TrialPruned(f"fold {fold}, epoch {results['epochs'][-1]['epoch']}")
            best = next(e for e in results["epochs"] if e["epoch"] == results["best_epoch"])
            values.append(_score(best, level))
        return sum(values) / len(values)


def _work(study: Study, space: dict[str, SearchDimension], out: Path, split_copy: Path, split: dict[str, Any],
          trainer: str, target: int, worker: int, setup: tuple | None = None, progress: Any = None) -> int:
    """One worker: run trials until `target` are finished or running (every machine's count)."""
    if setup:  # a worker process: its cores and GPU
        worker_setup(*setup, worker)
    states = _optuna().trial.TrialState
    ostudy, _ = open_study(study)
    objective = Objective(study, space, out, split_copy, split, trial_folds(study), trainer, target)
    ran = 0
    with signals.unwinding():  # in a worker, the SIGTERM run_hpo sends on an interrupt unwinds the trial
        while True:
            trials = ostudy.get_trials(deepcopy=False)
            waiting = sum(t.state == states.WAITING for t in trials)
            taken = sum(t.state in (states.COMPLETE, states.PRUNED, states.RUNNING) for t in trials)
            if not waiting and taken >= target:
                return ran
            ostudy.optimize(objective, n_trials=1, catch=(SurplusTrial,))
            ran += 1
            if progress is not None:
                progress(storages.finished_count(ostudy))


def run_hpo(study: Study, space: dict[str, SearchDimension], out: Path, split_copy: Path, split: dict[str, Any], *,
            workers: int, trials: int | None, trainer: str, console: Any) -> None:
    target = trials if trials is not None else study.hpo.trials  # hpo.folds and trials: checked with the file
    if target < 1:
        raise StudyError(f"--trials {target}: give 1 or more")
    ostudy, created = open_study(study)
    revived = storages.recover_dead_trials(ostudy)
    if created and study.hpo.enqueue_base:
        params = base_params(study, space)
        if params is not None:
            ostudy.enqueue_trial(params, user_attrs={"base": True})
        else:
            console.print("[yellow]note:[/] the base config's values lie outside hpo.space; no base trial")
    console.print(f"study {study.name}: {storages.finished_count(ostudy)} of {target} trials finished"
                  f"{f', {len(revived)} interrupted trial(s) resumed' if revived else ''}; "
                  f"storage {storages.redact(study.hpo.storage)}, {workers} worker(s)")
    with run_progress(console) as progress:
        bar = progress.add_task("trials", total=target, completed=storages.finished_count(ostudy), rate="")
        update = lambda done: progress.update(bar, completed=done)  # noqa: E731
        if workers == 1:
            _work(study, space, out, split_copy, split, trainer, target, 0, progress=update)
        else:
            from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
            from multiprocessing import get_context

            setup = pool_settings(workers)
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                     initializer=signals.stop_on_parent_term) as pool:
                pending = {pool.submit(_work, study, space, out, split_copy, split, trainer, target, w, setup)
                           for w in range(workers)}
                try:
                    while pending:  # the timeout only refreshes the bar from the storage
                        finished, pending = wait(pending, timeout=30, return_when=FIRST_EXCEPTION)
                        for future in finished:
                            future.result()
                        update(storages.finished_count(ostudy))
                except KeyboardInterrupt:  # Ctrl-C, SIGTERM: trials in flight stop now (the rerun resumes them)
                    signals.stop_pool(pool, grace_s=signals.UNWIND_GRACE_S)
                    raise
    if any(t.state.name == "COMPLETE" for t in ostudy.get_trials(deepcopy=False)):
        best = ostudy.best_trial
        console.print(f"best trial {best.user_attrs.get('run_number', best.number)}: objective "
                      f"{best.value:.4f} with {best.params}")
