"""Helpers shared by several test files (not a test module): the tiny real training setup, a fake
trainer that writes schema-valid results in milliseconds, and study-file writers.

The fake trainer's patch probabilities get better with a quality set by the config (normalisation and
learning rate), so studies have known winners. FAKE_LOG records every call; FAKE_KILL=SUBSTRING:EPOCH
makes the process SIGKILL itself at that epoch of the run whose directory contains SUBSTRING.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from stacktrain.testing import tissue, write_array
from stacktrain.train.config import TrainConfig, load_config
from stacktrain.train.demo import prepare_data
from stacktrain.train.results import RESULTS_NAME, load_results

FAKE = "tests.support:fake_train"
REAL = "tests.support:real_train"

ROOT = Path(__file__).resolve().parents[1]
NORM_QUALITY = {"scale": 0.6, "percentile": 0.9, "meanstd": 0.3}
PATCHES = 8


# -- the fake trainer ------------------------------------------------------------------------------
def _log_and_maybe_kill(run_dir: Path, resume: bool | None, epoch: int | None) -> None:
    if epoch is None and os.environ.get("FAKE_LOG"):
        with open(os.environ["FAKE_LOG"], "a") as f:
            parts = Path(run_dir).parts  # relative to the study directory: runs/... or trials/...
            start = max(i for i, p in enumerate(parts) if p in ("runs", "trials"))
            f.write(json.dumps({"run": "/".join(parts[start:]), "resume": resume}) + "\n")
    kill = os.environ.get("FAKE_KILL")
    if epoch is not None and kill:
        where, _, at = kill.rpartition(":")
        if where in str(run_dir) and epoch == int(at):
            os.kill(os.getpid(), signal.SIGKILL)


def quality(cfg) -> float:
    lr_factor = min(1.0, max(0.05, math.log10(cfg.optim.lr) + 4))  # 1e-3 -> 1, 1e-4 -> 0.05
    return NORM_QUALITY[cfg.preprocess.normalize] * lr_factor


def fake_train(cfg, *, run_dir, resume=False, on_epoch=None):
    from stacktrain.stores.reader import Store
    from stacktrain.train.config import config_to_dict
    from stacktrain.train.evaluator import Evaluator
    from stacktrain.train.results import epoch_entry, new_results, record_epoch, write_results
    from stacktrain.train.split import load_split, split_parts

    run_dir = Path(run_dir)
    _log_and_maybe_kill(run_dir, resume, None)
    path = run_dir / RESULTS_NAME
    results = load_results(path) if resume else new_results(config_to_dict(cfg), {"device": "fake"})
    store = Store(cfg.data.store)
    val = sorted(split_parts(load_split(cfg.data.split), cfg.data.fold)["val"])
    labels = np.array([store.meta(s).label_index for s in val])
    golden = (np.arange(len(val) * PATCHES) * 0.6180339887 + 0.05 * cfg.data.fold) % 1.0
    from stacktrain.train.early_stopping import EarlyStopping
    from stacktrain.train.evaluator import selection_key
    level_key = "volume_metrics" if cfg.train.select_level == "stack" else "patch_metrics"
    stopper = EarlyStopping(patience=10**6, min_delta=cfg.train.min_delta)  # the loop's rule, replayed on resume
    for e in results["epochs"]:
        stopper.step(selection_key(e[level_key], e["volume_metrics"], e["val_loss"]), e["epoch"])
    for epoch in range(len(results["epochs"]), cfg.train.epochs):
        _log_and_maybe_kill(run_dir, None, epoch)
        q = quality(cfg) * (epoch + 1) / cfg.train.epochs
        y = np.repeat(labels, PATCHES)
        prob = np.clip(0.5 + (2 * y - 1) * (q - golden) * 0.9, 0.01, 0.99)
        ev = Evaluator(val)
        ev.add(np.repeat(np.arange(len(val)), PATCHES),
               np.array([[0, 0, 16 * j] for j in range(PATCHES)] * len(val)),
               np.log(prob / (1 - prob)), y)
        evaluation = ev.finalize()
        stopper.step(evaluation.selection_key(cfg.train.select_level), epoch)
        best_epoch = stopper.best_epoch
        entry = epoch_entry(epoch=epoch, train_loss=1 - q, lr=cfg.optim.lr, evaluation=evaluation,
                            throughput={"train_patches_per_s": 100.0 + epoch, "data_wait_pct": 1.0,
                                                "optimizer_steps": 10 if cfg.patch.stride is None else 40},
                            wall_s=0.01)
        last = epoch + 1 == cfg.train.epochs
        record_epoch(results, entry, best_epoch=best_epoch, stop_reason="max_epochs" if last else None)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_results(path, results)
        (run_dir / "last.pt").write_bytes(b"fake")
        if on_epoch is not None and on_epoch(epoch, entry) and not last:
            results["stop_reason"] = "pruned"
            write_results(path, results)
            break
    return path


def real_train(cfg, *, run_dir, resume=False, on_epoch=None):
    """The real trainer, with FAKE_LOG and FAKE_KILL as above."""
    from stacktrain.train.loop import train
    _log_and_maybe_kill(run_dir, resume, None)

    def hook(epoch, entry):
        _log_and_maybe_kill(run_dir, None, epoch)
        return on_epoch(epoch, entry) if on_epoch else False
    return train(cfg, run_dir=run_dir, resume=resume, on_epoch=hook)


# -- fixtures --------------------------------------------------------------------------------------
def make_store(root: Path, n: int = 24, shape=(8, 16, 16), folds: int = 3) -> tuple[Path, Path]:
    """`n` tiny stacks (alternating SAIN/MALADE, two per patient) and a K-fold split of them."""
    from stacktrain.train.split import make_splits, write_split
    store = root / "store.zarr"
    for i in range(n):
        write_array(store, f"s{i:02d}", tissue((3, *shape), seed=i), label="MALADE" if i % 2 else "SAIN",
                    group=f"p{i // 2}", chunk_zyx=shape, shard_zyx=shape)
    write_split(make_splits(store, folds=folds, seed=0), root / "splits.json")
    return store, root / "splits.json"


def write_study(path: Path, store: Path, split: Path | None, body: str, *, sets=("train.epochs=3",), head="",
                base: Path | None = None) -> Path:
    """A study file on the demo preset, or on a previous study directory `base` (then `split` may be None:
    the base study's split is used)."""
    split_line = "" if split is None else f'split = "{split}"\n'
    path.write_text(f'[study]\nname = "{path.stem}"\nbase = "{base or f"{ROOT}/train/presets/demo.toml"}"\n'
                    f'{split_line}store = "{store}"\nset = {json.dumps(list(sets))}\n{head}\n{body}')
    return path


VARIANTS = """
[variants.scale]
preprocess = { normalize = "scale" }
[variants.percentile]
preprocess = { normalize = "percentile", percentile_low = 1.0, percentile_high = 99.0 }
"""


def log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_killed(study: Path, out: Path, trainer: str, env: dict[str, str], tmp_path: Path) -> None:
    """Run the study in a subprocess that FAKE_KILL kills; then kill what it leaves behind (DALI's
    worker processes outlive a SIGKILLed parent), found by its own process group."""
    code = ("from stacktrain.train.study.runner import run_study; "
            f"run_study({str(study)!r}, {str(out)!r}, trainer={trainer!r})")
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]



# -- a tiny real training ---------------------------------------------------------------------
PATCH = (16, 32, 32)
TINY = [f"patch.size={list(PATCH)}", "loader.loader=dali-cpu", "loader.batch_size=4", "loader.workers=0",
        "loader.dtype=fp32", "model.name=resnet3d18", "model.tiny=true", "train.device=cpu",
        "train.precision=fp32", "train.epochs=2", "train.log_interval=2", "train.select_level=stack"]


def tiny_data(root: Path, stacks: int = 8) -> tuple[Path, Path]:
    """8 synthetic stacks of 16x64x64 (4 patches each), their store and a patient split."""
    return prepare_data(root, stacks=stacks, shape_zyx=(16, 64, 64), patch_zyx=PATCH, val_fraction=0.3)


def tiny_config(store: Path, splits: Path, *overrides: str) -> TrainConfig:
    return load_config(None, [f"data.store={store}", f"data.split={splits}", *TINY, *overrides])


def hpo_body(trials: int) -> str:
    """A phase-3 study body: an Optuna search over the learning rate on folds 0-1, no pruning."""
    return (f'\n[hpo]\ntrials = {trials}\nfolds = [0, 1]\npruner = {{ kind = "none" }}\n[hpo.space]\n'
            '"optim.lr" = { type = "float", low = 1e-4, high = 1e-3, log = true }\n')
