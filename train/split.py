"""Train/val/test splits by stack, grouped by patient, stratified by label, seeded; `stacktrain split`.

The split file (JSON):

    {"format_version": 1, "store": "...", "store_id": "...", "params": {"folds", "val_fraction",
     "test_fraction", "seed"}, "folds": [{"train": [ids], "val": [ids], "test": [ids]}, ...], "sha256": "..."}

`sha256` is the hash of the canonical JSON of `folds` (sorted keys, no spaces): `split_hash`.
`store_id` is the identity of the store it was made for (`store_identity`: a hash of its stack ids,
labels and groups); `check_split` refuses the file for any other store, even one whose stack ids
overlap, and warns (once per file) about a file of an older stacktrain that has none.
A group (patient) never spans two parts: StratifiedGroupKFold assigns whole groups and balances
labels as far as the groups allow. Fractions are met to the nearest 1/k of the groups: a part of
fraction f is one fold of round(1/f) folds. The test part, if any, is drawn first, in the same call
as the folds (`--folds K --test-fraction F`), and the K folds split only the other patients: it is the
same in every fold and disjoint from every fold's train and val parts (check_split refuses a file
where it is not). Training reads only data.train_part and data.val_part; the test part is read once,
by a study's final step (train/study/final.py).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from stacktrain.config import anchor_paths, relative_paths
from stacktrain.errors import InputError, SplitError
from stacktrain.io import atomic_write_json
from stacktrain.stores.layout import UNLABELED
from stacktrain.stores.reader import Store

FORMAT_VERSION = 1
PARTS = ("train", "val", "test")


def store_identity(store: Store | str | Path) -> str:
    """A hash of the store's stacks, labels and groups: what a split (and a run) is made for."""
    rows = sorted([m.stack_id, m.label, m.group] for m in _open(store).stacks)
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def split_hash(folds: list[dict[str, list[str]]]) -> str:
    return hashlib.sha256(json.dumps(folds, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _open(store: Store | str | Path) -> Store:
    return store if isinstance(store, Store) else Store(store)


FRACTION_TOLERANCE = 0.2  # relative: 0.3 gives one of 3 folds (0.333); 0.9 cannot be had (at most 0.5)


def folds_for(fraction: float, flag: str) -> int:
    """round(1/fraction) folds, of which the part is one; refused when 1/k is far from what was asked."""
    k = max(2, round(1 / fraction))
    if abs(1 / k - fraction) > FRACTION_TOLERANCE * fraction:
        raise InputError(f"{flag} {fraction:g}: a part is one of k folds of the patients, so the fractions that can "
                         f"be had are 1/2, 1/3, 1/4, ...; {fraction:g} would give {1 / k:.3g} (one of {k}): give "
                         f"{1 / k:.3g}, or a fraction near 1/k")
    return k


def _one_fold(y: np.ndarray, groups: np.ndarray, k: int, seed: int, what: str, where: str):
    """Indices (rest, part) where `part` is one of `k` group folds, stratified."""
    return next(_kfold(y, groups, k, seed, what, where))


def _kfold(y: np.ndarray, groups: np.ndarray, k: int, seed: int, what: str, where: str):
    n_groups = len(set(groups.tolist()))
    if n_groups < k:
        raise InputError(f"{where}: {what} needs {k} groups (patients) to split, the store has {n_groups} "
                         f"among {len(y)} stacks; lower --folds or raise the fractions")
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": we check below
        warnings.simplefilter("ignore", UserWarning)
        from sklearn.model_selection import StratifiedGroupKFold  # slow import: only when splitting

        try:
            folds = list(StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, groups))
        except ValueError as e:  # e.g. fewer stacks of a label than folds
            raise InputError(f"{where}: {what} cannot be split into {k} stratified group folds ({e}); lower "
                             "--folds or raise the fractions") from None
    yield from folds


def make_splits(store: Store | str | Path, *, folds: int | None = None, val_fraction: float = 0.2,
                test_fraction: float = 0.0, seed: int = 0, allow_one_class: bool = False) -> dict[str, Any]:
    """Split the store's stacks into train/val(/test) by patient group; K folds when `folds` is given.
    A part that holds only one class is refused (`allow_one_class`: kept, with a warning)."""
    store = _open(store)
    where = str(store.path)
    if folds is not None and folds < 2:
        raise InputError(f"--folds {folds}: give 2 or more folds (or leave it out for one split)")
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise InputError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction}: each must be "
                         "in [0, 1) (val > 0) and their sum below 1")
    metas = [m for m in store.stacks if m.label != UNLABELED]  # stacks to predict on have no place here
    unlabeled = sorted(m.stack_id for m in store.stacks if m.label == UNLABELED)
    if len(metas) < 2:
        raise InputError(f"{where}: {len(metas)} stack(s); a split needs at least 2")
    ids = np.array([m.stack_id for m in metas])
    y = np.array([m.label_index for m in metas])
    groups = np.array([m.group for m in metas])
    rest, test = np.arange(len(ids)), np.array([], dtype=int)
    if test_fraction > 0:
        rest, test = _one_fold(y, groups, folds_for(test_fraction, "--test-fraction"), seed, "the test part", where)
    if folds is None:
        rel = val_fraction / (1 - test_fraction)  # of what is left after the test part
        pairs = [_one_fold(y[rest], groups[rest], folds_for(rel, "--val-fraction"), seed, "the val part", where)]
    else:
        pairs = list(_kfold(y[rest], groups[rest], folds, seed, f"{folds} folds", where))
    out = [{"train": sorted(ids[rest[tr]].tolist()), "val": sorted(ids[rest[va]].tolist()),
            "test": sorted(ids[test].tolist())} for tr, va in pairs]
    split = {"format_version": FORMAT_VERSION, "store": where, "store_id": store_identity(store),
             "params": {"folds": folds, "val_fraction": val_fraction, "test_fraction": test_fraction,
                        "seed": seed},
             "folds": out, "sha256": split_hash(out), "unlabeled": unlabeled}
    check_split(split, store)
    _check_classes(out, {m.stack_id: m.label for m in metas}, where, allow_one_class)
    return split


def _check_classes(folds: list[dict[str, list[str]]], labels: dict[str, str], where: str, allow: bool) -> None:
    """Every non-empty part holds both classes; otherwise one line with the counts (a warning if allowed)."""
    for i, fold in enumerate(folds):
        for part in PARTS:
            ids = fold.get(part, [])
            counts = Counter(labels[s] for s in ids)
            if ids and len(counts) < 2:
                held = ", ".join(f"{n} {k}" for k, n in counts.items())
                text = (f"{where}: fold {i}: the {part} part holds only {held} ({len(ids)} stacks); with so few "
                        "stacks of a class, use fewer folds or larger fractions, or a leave-one-patient-out design")
                if not allow:
                    raise InputError(text + " (--allow-one-class keeps such a split)")
                warnings.warn(text, UserWarning, stacklevel=3)
                return


def check_split(split: dict[str, Any], store: Store | str | Path, where: str = "split") -> None:
    """Refuse a split made for another store, unknown stacks, and any stack or group (patient) found in
    two parts of a fold."""
    store = _open(store)
    _check_store_id(split, store, where)
    metas = {m.stack_id: m for m in store.stacks}
    folds = split.get("folds")
    if not isinstance(folds, list) or not folds:
        raise SplitError(f"{where}: no 'folds' list; make the file with `stacktrain split`")
    for i, fold in enumerate(folds):
        unknown = sorted({sid for ids in fold.values() for sid in ids} - set(metas))
        if unknown:
            raise SplitError(f"{where}: fold {i} names stacks not in {store.path}: "
                             f"{', '.join(unknown[:10])}; was the split made for another store?")
        unlabeled = sorted(sid for ids in fold.values() for sid in ids if metas[sid].label == UNLABELED)
        if unlabeled:
            raise SplitError(f"{where}: fold {i} holds unlabeled stack(s) {', '.join(unlabeled[:10])}; they are "
                             "for prediction only: label them (`stacktrain relabel`) and regenerate the split")
        seen: dict[str, str] = {}
        for part, ids in fold.items():
            for sid in ids:
                if sid in seen:
                    raise SplitError(f"{where}: fold {i}: stack {sid!r} is in both {seen[sid]!r} and "
                                     f"{part!r}; a stack belongs to one part")
                seen[sid] = part
        group_parts: dict[str, set[str]] = {}
        for sid, part in seen.items():
            group_parts.setdefault(metas[sid].group, set()).add(part)
        leaks = {g: parts for g, parts in group_parts.items() if len(parts) > 1}
        if leaks:
            g, parts = sorted(leaks.items())[0]
            stacks = sorted(s for s, p in seen.items() if metas[s].group == g)
            raise SplitError(f"{where}: fold {i}: group (patient) {g!r} is in parts "
                             f"{', '.join(sorted(parts))} (stacks {', '.join(stacks)}); {len(leaks)} "
                             "group(s) leak in all. A patient must stay in one part: regenerate with "
                             "`stacktrain split`")
    _check_test_part(folds, metas, where)
    if "sha256" in split and split["sha256"] != split_hash(folds):
        raise SplitError(f"{where}: the parts do not match the recorded sha256 (the file was edited); "
                         "regenerate it with `stacktrain split` or remove the sha256 entry")


def _check_store_id(split: dict[str, Any], store: Store, where: str) -> None:
    have = store_identity(store)
    made_for = split.get("store_id")
    if made_for is None:
        warnings.warn(f"{where}: an older split file without the identity of its store (store_id); it cannot be "
                      f"checked against {store.path}: remake it with `stacktrain split {store.path} --out FILE`",
                      UserWarning, stacklevel=3)
    elif made_for != have:
        raise SplitError(f"{where}: made for store {split.get('store', '?')} (identity {str(made_for)[:12]}), "
                         f"not for {store.path} (identity {have[:12]}); remake the split with `stacktrain split "
                         f"{store.path} --out FILE`")


def _check_test_part(folds: list[dict[str, list[str]]], metas: dict[str, Any], where: str) -> None:
    """The held-out test part is one set shared by every fold, and no fold trains or validates on its
    stacks or its patients."""
    tests = [sorted(f.get("test", [])) for f in folds]
    if any(t != tests[0] for t in tests):
        raise SplitError(f"{where}: the folds hold different test parts; the held-out test part is one set "
                         "shared by every fold: regenerate it with `stacktrain split --folds K --test-fraction F`")
    test_groups = {metas[s].group for s in tests[0]}
    for i, fold in enumerate(folds):
        for part in ("train", "val"):
            hit = sorted(s for s in fold.get(part, []) if metas[s].group in test_groups)
            if hit:
                raise SplitError(f"{where}: fold {i}: {part} holds stack(s) {', '.join(hit[:5])} of a patient of "
                                 "the held-out test part; regenerate the file with `stacktrain split`")


def write_split(split: dict[str, Any], path: str | Path) -> None:
    """Atomically; its `store` relative to the file's folder (as `load_split` reads it)."""
    split = relative_paths(dict(split), ("store",), Path(path).parent)
    atomic_write_json(Path(path), split)


def load_split(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        split = json.loads(path.read_text())
    except FileNotFoundError:
        raise SplitError(f"{path}: split file not found; make it with "
                         f"`stacktrain split STORE --out {path}`") from None
    except json.JSONDecodeError as e:
        raise SplitError(f"{path}: not valid JSON ({e}); regenerate it with `stacktrain split`") from None
    if not isinstance(split, dict):
        raise SplitError(f"{path}: not a split file; make it with `stacktrain split`")
    return anchor_paths(split, ("store",), path.parent)


def split_parts(split: dict[str, Any], fold: int = 0, where: str = "split") -> dict[str, list[str]]:
    """The part -> stack ids of one fold."""
    folds = split.get("folds") or []
    if not 0 <= fold < len(folds):
        raise SplitError(f"{where}: fold {fold} requested (data.fold) but the file has {len(folds)} fold(s), "
                         f"numbered 0..{len(folds) - 1}")
    return {part: list(ids) for part, ids in folds[fold].items()}


def split_table(split: dict[str, Any], store: Store | str | Path):
    """A rich table of a split: per fold and part, the stacks, patients and labels."""
    from rich.table import Table

    store = _open(store)
    table = Table(title=f"split of {store.path} (seed {split['params']['seed']})")
    for col in ("fold", "part", "stacks", "groups", "SAIN", "MALADE"):
        table.add_column(col, justify="left" if col in ("fold", "part") else "right")
    metas = {m.stack_id: m for m in store.stacks}
    for i, fold in enumerate(split["folds"]):
        for part in PARTS:
            ids = fold.get(part, [])
            if not ids and part == "test":
                continue
            labels = Counter(metas[s].label for s in ids)
            table.add_row(str(i), part, str(len(ids)), str(len({metas[s].group for s in ids})),
                          str(labels["SAIN"]), str(labels["MALADE"]))
    return table
