"""Checkpoints `RUN_DIR/last.pt` and `RUN_DIR/best.pt`: everything a resume needs, loaded weights-only.

A checkpoint holds plain tensors, numbers, strings, lists and dicts only, so `torch.load(...,
weights_only=True)` reads it (no pickled code runs). Contents:

    format_version, model_name, model_tiny, epoch, config (dict), model (state_dict),
    optimizer, scaler (state_dicts), early_stopping (state_dict), rng {python, numpy, torch, cuda},
    data {store, parts, intensity} (optional: the identity of the store and of the train/val stacks, and
    the store's dtype and intensity mapping, stores.intensity.mapping_of: predict refuses another)

The RNG states are those at the end of `epoch`, so resuming continues the same random streams.
Whatever is wrong with a file (missing, a folder, empty, truncated, foreign bytes, another kind of torch
file, a key missing or of the wrong type, states that do not fit the model or optimizer) is one
CheckpointError naming the file and the fault: `load_checkpoint` checks the shape of the contents,
`restore` the fit of each state.
"""

from __future__ import annotations

import io
import os
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
from stacktrain.io import atomic_write, atomic_write_bytes

FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
# key -> the types its value may have (None: may be absent too, e.g. a checkpoint saved without optimizer)
CONTENTS: dict[str, tuple[type, ...]] = {
    "format_version": (int,), "model_name": (str,), "model_tiny": (bool,), "epoch": (int,), "config": (dict,),
    "model": (dict,), "optimizer": (dict, type(None)), "scaler": (dict, type(None)),
    "early_stopping": (dict, type(None)), "rng": (dict,),
}
RNG_KEYS = ("python", "numpy", "torch", "cuda")


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none (an empty file's EOFError)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


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
                    model_name: str, model_tiny: bool = False, data: dict[str, str] | None = None,
                    threshold: float = 0.5) -> None:
    """Write a checkpoint atomically (a kill -9 or a full disk leaves the previous one intact). `data`: the
    identity of the store and train/val stacks (train/resume.py), checked on resume; `threshold`: the
    epoch's stack threshold (0.5, or tuned on validation), what `predict` applies."""
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
        "threshold": float(threshold),
    }
    if data is not None:
        state["data"] = data
    buf = io.BytesIO()  # serialised in memory first: a full disk is then an OSError of known size
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getbuffer())


def _flavor(name: str, tiny: bool) -> str:
    return f"{name!r} ({'tiny' if tiny else 'full'})"


def _read(path: Path, map_location: Any) -> Any:
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint; give RUN_DIR/{BEST} or RUN_DIR/{LAST}")
    try:
        with open(path, "rb") as f:
            head = f.read(len(ZIP_MAGIC))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no checkpoint there; a run directory holds {LAST} and {BEST}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror})") from None
    if not head:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint (a write cut short?); use the "
                              "run's other checkpoint or --resume to rewrite it")
    if head != ZIP_MAGIC:
        raise CheckpointError(f"{path}: not a checkpoint file (torch.save writes a zip archive, this file "
                              "starts otherwise); give a best.pt or last.pt written by stacktrain")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: holds objects other than tensors and plain values, which "
                              "torch.load(weights_only=True) refuses; use a checkpoint written by "
                              "stacktrain") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt "
                              f"({_first_line(e)}); use the run's other checkpoint") from None


def contents_problems(ckpt: Any) -> list[str]:
    """What is missing or of the wrong type in a loaded checkpoint (empty: its shape is right)."""
    problems = []
    for key, types in CONTENTS.items():
        if key not in ckpt:
            problems.append(f"no {key!r}")
        elif not isinstance(ckpt[key], types) or (int in types and isinstance(ckpt[key], bool)):
            problems.append(f"{key!r} is a {type(ckpt[key]).__name__}")
    if isinstance(ckpt.get("model"), dict) and not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        problems.append("'model' holds values other than tensors")
    if isinstance(ckpt.get("rng"), dict) and set(RNG_KEYS) - set(ckpt["rng"]):
        problems.append(f"'rng' lacks {', '.join(sorted(set(RNG_KEYS) - set(ckpt['rng'])))}")
    if isinstance(ckpt.get("epoch"), int) and ckpt["epoch"] < 0:
        problems.append(f"'epoch' is {ckpt['epoch']}")
    return problems


def load_checkpoint(path: str | Path, *, model_name: str | None = None, model_tiny: bool | None = None,
                    map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with weights_only=True; refuse a malformed one, or one saved from another model
    than expected."""
    path = Path(path)
    ckpt = _read(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != FORMAT_VERSION:
        what = f"a {type(ckpt).__name__}" if not isinstance(ckpt, dict) else \
            f"format_version {ckpt.get('format_version')!r}"
        raise CheckpointError(f"{path}: not a stacktrain checkpoint of format {FORMAT_VERSION} (it holds {what}); "
                              "give a best.pt or last.pt written by `stacktrain train`")
    problems = contents_problems(ckpt)
    if problems:
        raise CheckpointError(f"{path}: a damaged stacktrain checkpoint ({'; '.join(problems)}); use the run's "
                              "other checkpoint, or retrain")
    saved_name, saved_tiny = ckpt["model_name"], ckpt["model_tiny"]
    if (model_name is not None and model_name != saved_name) or (
            model_tiny is not None and bool(model_tiny) != saved_tiny):
        want = _flavor(model_name or saved_name, saved_tiny if model_tiny is None else model_tiny)
        raise CheckpointError(f"{path}: saved from model {_flavor(saved_name, saved_tiny)}, but this run "
                              f"builds {want}; set model.name/model.tiny to match the checkpoint or "
                              "start a new run directory")
    return ckpt


def saved_epoch(path: Path) -> int | None:
    """The epoch a checkpoint was saved after, or None when it is missing or unreadable."""
    try:
        return int(load_checkpoint(path)["epoch"])
    except CheckpointError:
        return None


def copy_checkpoint(src: Path, dst: Path) -> None:
    """best.pt as an atomic copy of the last.pt just written (the same epoch, the same bytes)."""
    with open(src, "rb") as f:
        atomic_write(dst, lambda out: shutil.copyfileobj(f, out, 1 << 20), size=os.fstat(f.fileno()).st_size)


def repair_best(run_dir: Path, *, best_epoch: int | None, last_epoch: int) -> None:
    """On resume: when last.pt's best epoch is its own epoch but best.pt holds another (a kill between
    the two writes), copy last.pt over best.pt, so best.pt is always the results' best_epoch."""
    best, last = Path(run_dir) / BEST, Path(run_dir) / LAST
    if best_epoch != last_epoch:
        return
    if saved_epoch(best) != last_epoch:  # missing, damaged, or of another epoch
        copy_checkpoint(last, best)


_FIT_ERRORS = (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError)


def restore(ckpt: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
            scaler: Any | None = None, early_stopping: Any | None = None, rng: bool = True,
            where: str | Path = "checkpoint") -> int:
    """Load the states into the given objects; return the epoch the checkpoint was saved after."""
    flavor = _flavor(ckpt["model_name"], ckpt["model_tiny"])
    try:
        unwrap(model).load_state_dict(ckpt["model"])
    except _FIT_ERRORS as e:  # same name, different shapes (e.g. other model.options)
        raise CheckpointError(f"{where}: checkpoint of {flavor} does not fit this model: {_first_line(e)}; "
                              "check model.options") from None
    steps = [("optimizer", optimizer, optimizer is not None and ckpt["optimizer"] is not None),
             ("scaler", scaler, scaler is not None and bool(ckpt["scaler"])),
             ("early_stopping", early_stopping, early_stopping is not None and ckpt["early_stopping"] is not None)]
    for key, target, wanted in steps:
        if wanted:
            try:
                target.load_state_dict(ckpt[key])
            except _FIT_ERRORS as e:
                raise CheckpointError(f"{where}: its {key} state does not fit this run ({_first_line(e)}); "
                                      "the file is damaged or from another setup: start a new run directory") \
                    from None
    if rng:
        try:
            set_rng_state(ckpt["rng"])
        except _FIT_ERRORS as e:
            raise CheckpointError(f"{where}: its random-number states are damaged ({_first_line(e)}); start a "
                                  "new run directory") from None
    return int(ckpt["epoch"])


def stack_threshold(ckpt: dict[str, Any]) -> float:
    """The stack threshold a checkpoint decides with (0.5 in checkpoints older than train.threshold)."""
    return float(ckpt.get("threshold", 0.5))


def checkpoint_paths(run_dir: str | Path) -> dict[str, Path]:
    run_dir = Path(run_dir)
    return {"last": run_dir / LAST, "best": run_dir / BEST}
