"""Store maintenance without reconverting: `stacktrain relabel` and `stacktrain remove`.

Both take the store's convert lock (no convert or other maintenance writes meanwhile), change only
metadata, atomically, and keep the root stack list consistent with the stack folders. A stack folder
deleted by hand is dropped from the list by `remove` (and reported by `info`, not fatal).
"""

from __future__ import annotations

import json
from pathlib import Path

from stacktrain.errors import StoreError
from stacktrain.io import atomic_write_json

from . import writer
from .convert_lock import exclusive
from .layout import LABELS, StackMeta


def _listed(store: Path) -> list[str]:
    root = json.loads((store / "zarr.json").read_text())
    return [e["stack_id"] for e in root["attributes"]["stacktrain"]["stacks"]]


def _open(store: str | Path) -> Path:
    store = Path(store)
    if not (store / "zarr.json").is_file():
        raise StoreError(f"{store}: not a stacktrain store (no zarr.json); give the --out of `stacktrain convert`")
    return store


def _metas(store: Path) -> list[StackMeta]:
    """The listed stacks whose folders exist, in list order."""
    return [m for sid in _listed(store) if (m := writer.existing_meta(store, sid)) is not None]


def relabel(store: str | Path, stack_id: str, label: str, group: str | None = None) -> StackMeta:
    """Set a stack's label (and group) in its metadata and in the root list."""
    store = _open(store)
    label = label.strip().upper()
    if label not in LABELS:
        raise StoreError(f"label {label!r}: give one of {', '.join(LABELS)} (any case)")
    if group is not None and not group.strip():
        raise StoreError("--group: give the patient id (stacks of one patient share it), or leave it out")
    with exclusive(store):
        if stack_id not in _listed(store) or writer.existing_meta(store, stack_id) is None:
            raise StoreError(f"{store}: no stack {stack_id!r}; `stacktrain info {store}` lists them")
        path = store / stack_id / "zarr.json"
        doc = json.loads(path.read_text())
        doc["attributes"]["stacktrain"]["label"] = label
        if group is not None:
            doc["attributes"]["stacktrain"]["group"] = group.strip()
        atomic_write_json(path, doc)  # the stack's own metadata first: the list follows it
        writer.register(store, _metas(store))
        return writer.existing_meta(store, stack_id)


def remove(store: str | Path, stack_ids: list[str]) -> list[str]:
    """Remove stacks (folders and list entries); ids listed but already deleted by hand are dropped too."""
    store = _open(store)
    with exclusive(store):
        listed = _listed(store)
        unknown = [s for s in stack_ids if s not in listed and not (store / s).is_dir()]
        if unknown:
            raise StoreError(f"{store}: no stack {', '.join(map(repr, unknown))}; `stacktrain info {store}` lists them")
        keep = [m for m in _metas(store) if m.stack_id not in stack_ids]
        writer.register(store, keep)  # out of the list first: a kill then leaves only an unlisted folder
        for sid in stack_ids:
            writer.remove_stack(store, sid)
        return stack_ids
