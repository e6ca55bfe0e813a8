"""Checkpoints `RUN_DIR/last.pt` and `RUN_DIR/best.pt`: everything a resume needs, loaded weights-only.

A checkpoint holds plain tensors, numbers, strings, lists and dicts only, so `torch.load(...,
weights_only=True)` reads it (no pickled code runs). Contents:

    format_version, model_name, model_tiny, epoch, config (dict), model (state_dict),
    optimizer, scaler (state_dicts), early_stopping (state_dict), rng {python, numpy, torch, cuda}

The RNG states are those at the end of `epoch`, so resuming continues the same random streams.
"""

from __future__ import annotations

import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stacktrain.errors import CheckpointError
from stacktrain.io import atomic_write

FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"




def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


# -- RNG states as weights-only-loadable values ----------------------------------------------------
def rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(mt), gauss],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    saved = list(state["cuda"])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(saved) > visible:
        warnings.warn(f"the checkpoint holds the RNG states of {len(saved)} CUDA device(s), {visible} are visible "
                      f"here: restoring {min(len(saved), visible)}, the others' random streams start afresh",
                      stacklevel=2)
    for index, device_state in enumerate(saved[:visible]):  # only devices that exist
        torch.cuda.set_rng_state(device_state, index)


# -- save / load -----------------------------------------------------------------------------------
def save_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    scaler: Any | None, epoch: int, early_stopping: Any | None, config: dict[str, Any],
                    model_name: str, model_tiny: bool = False) -> None:
    """Write a checkpoint atomically (a kill -9 leaves the previous one intact)."""
    state = {
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "model_tiny": bool(model_tiny),
        "epoch": int(epoch),
        "config": config,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "early_stopping": early_stopping.state_dict() if early_stopping is not None else None,
        "rng": rng_state(),
    }
    atomic_write(path, lambda f: torch.save(state, f))


def _flavor(name: str, tiny: bool) -> str:
    return f"{name!r} ({'tiny' if tiny else 'full'})"


def load_checkpoint(path: str | Path, *, model_name: str | None = None, model_tiny: bool | None = None,
                    map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; refuse one saved from another model than expected."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint there; a run directory holds {LAST} and {BEST}") \
            from None
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: holds objects other than tensors and plain values, which "
                              "torch.load(weights_only=True) refuses; use a checkpoint written by "
                              "stacktrain") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt "
                              f"({str(e).splitlines()[0]}); use the run's other checkpoint") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a stacktrain checkpoint of format {FORMAT_VERSION}")
    saved_name, saved_tiny = ckpt["model_name"], ckpt["model_tiny"]
    if (model_name is not None and model_name != saved_name) or (
            model_tiny is not None and bool(model_tiny) != saved_tiny):
        want = _flavor(model_name or saved_name, saved_tiny if model_tiny is None else model_tiny)
        raise CheckpointError(f"{path}: saved from model {_flavor(saved_name, saved_tiny)}, but this run "
                              f"builds {want}; set model.name/model.tiny to match the checkpoint or "
                              "start a new run directory")
    return ckpt


def copy_checkpoint(src: Path, dst: Path) -> None:
    """best.pt as an atomic copy of the last.pt just written (the same epoch, the same bytes)."""
    with open(src, "rb") as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20))


def repair_best(run_dir: Path, *, best_epoch: int | None, last_epoch: int) -> None:
    """On resume: when last.pt's best epoch is its own epoch but best.pt holds another (a kill between
    the two writes), copy last.pt over best.pt, so best.pt is always the results' best_epoch."""
    best, last = Path(run_dir) / BEST, Path(run_dir) / LAST
    if best_epoch != last_epoch:
        return
    have = torch.load(best, map_location="cpu", weights_only=True).get("epoch") if best.exists() else None
    if have != last_epoch:
        copy_checkpoint(last, best)


def restore(ckpt: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
            scaler: Any | None = None, early_stopping: Any | None = None, rng: bool = True) -> int:
    """Load the states into the given objects; return the epoch the checkpoint was saved after."""
    try:
        unwrap(model).load_state_dict(ckpt["model"])
    except RuntimeError as e:  # same name, different shapes (e.g. other model.options)
        raise CheckpointError(f"checkpoint of {_flavor(ckpt['model_name'], ckpt['model_tiny'])} does not fit "
                              f"this model: {str(e).splitlines()[0]}; check model.options") from None
    if optimizer is not None and ckpt["optimizer"] is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    if early_stopping is not None and ckpt["early_stopping"] is not None:
        early_stopping.load_state_dict(ckpt["early_stopping"])
    if rng:
        set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"])


def checkpoint_paths(run_dir: str | Path) -> dict[str, Path]:
    run_dir = Path(run_dir)
    return {"last": run_dir / LAST, "best": run_dir / BEST}
