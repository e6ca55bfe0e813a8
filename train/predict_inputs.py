"""What `stacktrain predict CHECKPOINT INPUT...` reads: a store as it is, or raw stacks converted first.

INPUT is a store (a folder with a stacktrain `zarr.json`), a manifest (`.csv`: `path` and `stack_id`
suffice; an empty or absent `label` is an unlabeled stack), or raw stack files (each one a stack named
after its file). Raw stacks are converted the way the model's training store was, as far as the
checkpoint says: its dtype and intensity mapping (`data.intensity`, stores/intensity.py), every stack
padded to at least one patch of the model's size (padding is recorded and never predicted on, see
stores/stats.py), unlabeled rows allowed. Into `--store STORE.zarr` when given (kept; a rerun skips
the stacks already there), else into a temporary store next to `--out`, removed afterwards.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stacktrain.errors import ConfigError
from stacktrain.io import atomic_write_csv
from stacktrain.stores.convert import convert
from stacktrain.stores.layout import check_stack_id
from stacktrain.stores.options import DEFAULT_WORKERS, ConvertOptions

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def is_store(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def stack_name(path: Path, taken: set[str]) -> str:
    """A stack id from a file's name (suffixes such as .nii.gz or .ome.tif dropped), made safe and unique."""
    stem = path.name
    while Path(stem).suffix and len(Path(stem).suffix) <= 5:
        stem = Path(stem).stem
    name = _UNSAFE.sub("_", stem).strip("._-") or "stack"
    if not name[0].isalnum() or check_stack_id(name):
        name = f"s_{name}"
    unique, n = name, 2
    while unique in taken:
        unique, n = f"{name}-{n}", n + 1
    taken.add(unique)
    return unique


def convert_options(ckpt: dict[str, Any], patch_zyx, *, workers: int = DEFAULT_WORKERS, axes: str | None = None,
                    replicate_channels: bool = False) -> ConvertOptions:
    """How raw stacks are converted for this checkpoint: its training store's recorded mapping, padded to
    one patch of its size, unlabeled rows allowed."""
    opts = ConvertOptions(workers=workers, axes=axes, replicate_channels=replicate_channels, pad=True,
                          allow_unlabeled=True, min_patch_zyx=tuple(int(n) for n in patch_zyx))
    record = (ckpt.get("data") or {}).get("intensity")
    return opts.with_mapping(record) if record else opts


def _file_manifest(files: list[Path], folder: Path) -> Path:
    """A manifest (path, stack_id) of raw files, written into `folder`."""
    taken: set[str] = set()
    for f in files:
        if not f.exists():
            raise ConfigError(f"{f}: not found; give a store, a manifest (.csv) or raw stack files to predict on")
    path = folder / "inputs.csv"
    atomic_write_csv(path, [("path", "stack_id"), *((str(f.resolve()), stack_name(f, taken)) for f in files)])
    return path


@contextlib.contextmanager
def input_store(inputs: list[Path], ckpt: dict[str, Any], patch_zyx, *, out: Path, store: Path | None = None,
                progress=None, **options) -> Iterator[tuple[Path, list[str] | None, bool]]:
    """(the store to predict on, the stack ids to predict (None: all), whether the store is kept), with
    raw inputs converted first (see the module docstring); a temporary store is removed on leaving."""
    inputs = [Path(p) for p in inputs]
    if len(inputs) == 1 and is_store(inputs[0]):
        if store is not None:
            raise ConfigError(f"--store {store}: {inputs[0]} is a store already; --store names where raw "
                              "inputs are converted")
        yield inputs[0], None, True
        return
    anchor = Path(out).resolve().parent
    anchor.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".stacktrain-predict-", dir=anchor))
    try:
        if len(inputs) == 1 and inputs[0].suffix.lower() == ".csv":
            manifest = inputs[0]
        else:
            manifest = _file_manifest(inputs, scratch)
        opts = convert_options(ckpt, patch_zyx, **options)
        target = store if store is not None else scratch / "inputs.zarr"
        report = convert(manifest, target, opts, progress=progress)  # outcomes in manifest order
        yield target, [o.stack_id for o in report.outcomes], store is not None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
