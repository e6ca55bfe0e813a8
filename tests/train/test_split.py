"""Splits: by stack, grouped by patient, stratified, seeded; K folds; leak checks; the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stacktrain.cli import main
from stacktrain.errors import InputError, StoreError
from stacktrain.stores.reader import Store
from stacktrain.testing import write_array
from stacktrain.train.split import (
    SplitError,
    check_split,
    load_split,
    make_splits,
    split_hash,
    split_parts,
    write_split,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """16 stacks of 8 patients (2 stacks each); patients p0-p3 SAIN, p4-p7 MALADE."""
    path = tmp_path_factory.mktemp("split") / "s.zarr"
    for i in range(16):
        patient = i // 2
        write_array(path, f"st{i:02d}", np.full((1, 8, 16, 16), i, np.uint8),
                    label="MALADE" if patient >= 4 else "SAIN", group=f"p{patient}")
    return Store(path)


def groups_of(store, ids):
    return {store.meta(s).group for s in ids}


def test_one_split_is_grouped_stratified_and_seeded(store):
    split = make_splits(store, val_fraction=0.25, seed=0)
    (fold,) = split["folds"]
    assert sorted(fold["train"] + fold["val"]) == sorted(store.stack_ids) and fold["test"] == []
    assert not groups_of(store, fold["train"]) & groups_of(store, fold["val"])
    assert len(fold["val"]) == 4  # a quarter of the 8 patients = 2 patients = 4 stacks
    assert {store.meta(s).label for s in fold["val"]} == {"SAIN", "MALADE"}  # stratified
    assert make_splits(store, val_fraction=0.25, seed=0) == split
    assert any(make_splits(store, val_fraction=0.25, seed=s)["folds"] != split["folds"] for s in (1, 2, 3))
    assert split["sha256"] == split_hash(split["folds"]) and split["params"]["seed"] == 0


def test_k_folds_and_a_fixed_test_part(store):
    split = make_splits(store, folds=3, test_fraction=0.25, seed=5)
    folds = split["folds"]
    assert len(folds) == 3 and all(f["test"] == folds[0]["test"] for f in folds)
    test = set(folds[0]["test"])
    assert len(test) == 4 and {store.meta(s).label for s in test} == {"SAIN", "MALADE"}
    vals = [s for f in folds for s in f["val"]]
    assert sorted(vals) == sorted(set(store.stack_ids) - test)  # every other stack is validated once
    for f in folds:
        parts = [groups_of(store, f[p]) for p in ("train", "val", "test")]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert split_parts(split, 2) == folds[2]
    with pytest.raises(SplitError, match=r"fold 3 requested.*has 3 fold\(s\), numbered 0..2"):
        split_parts(split, 3)


def test_check_split_refuses_leaks_unknown_stacks_and_edits(store, tmp_path):
    split = make_splits(store, val_fraction=0.25, seed=0)
    fold = split["folds"][0]
    val_patient = store.meta(fold["val"][0]).group
    partner = next(s for s in fold["val"][1:] if store.meta(s).group == val_patient)

    leak = json.loads(json.dumps(split))
    leak["folds"][0]["val"].remove(partner)
    leak["folds"][0]["train"].append(partner)
    with pytest.raises(SplitError, match=rf"group \(patient\) '{val_patient}' is in parts train, val"):
        check_split(leak, store)

    twice = json.loads(json.dumps(split))
    twice["folds"][0]["train"].append(fold["val"][0])
    with pytest.raises(SplitError, match=rf"stack '{fold['val'][0]}' is in both 'train' and 'val'"):
        check_split(twice, store)

    unknown = json.loads(json.dumps(split))
    unknown["folds"][0]["val"].append("ghost")
    with pytest.raises(SplitError, match="stacks not in .*: ghost"):
        check_split(unknown, store)

    moved = json.loads(json.dumps(split))  # a legal but hand-edited split: the hash gives it away
    moved["folds"][0]["train"] = [s for s in fold["train"] if store.meta(s).group != "p0"]
    with pytest.raises(SplitError, match="do not match the recorded sha256"):
        check_split(moved, store)
    del moved["sha256"]
    check_split(moved, store)

    path = tmp_path / "splits.json"
    write_split(split, path)
    assert load_split(path) == split
    with pytest.raises(SplitError, match="split file not found"):
        load_split(tmp_path / "none.json")


def test_bad_requests(store, tmp_path):
    with pytest.raises(InputError, match="9 folds needs 9 groups .* the store has 8"):
        make_splits(store, folds=9)
    with pytest.raises(InputError, match="--val-fraction 0.6 and --test-fraction 0.5"):
        make_splits(store, val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(StoreError, match="store not found"):
        make_splits(tmp_path / "missing.zarr")


def test_cli_writes_the_file_and_prints_counts(store, tmp_path, capsys):
    out = tmp_path / "splits.json"
    assert main(["split", str(store.path), "--out", str(out), "--folds", "2", "--seed", "3"]) == 0
    split = load_split(out)
    assert len(split["folds"]) == 2 and split["params"] == {
        "folds": 2, "val_fraction": 0.2, "test_fraction": 0.0, "seed": 3}
    check_split(split, store)
    printed = capsys.readouterr().out
    assert "MALADE" in printed and "train" in printed and f"wrote {out}" in printed.replace("\n", "")


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """30 stacks of 14 patients with 1-4 stacks each, 40 % MALADE patients."""
    path = tmp_path_factory.mktemp("uneven") / "u.zarr"
    sizes = [1, 4, 2, 3, 1, 1, 2, 4, 3, 1, 2, 2, 3, 1]
    i = 0
    for patient, n in enumerate(sizes):
        for _ in range(n):
            write_array(path, f"u{i:02d}", np.full((1, 8, 16, 16), i, np.uint8),
                        label="MALADE" if patient % 5 in (1, 3) else "SAIN", group=f"p{patient:02d}")
            i += 1
    return Store(path)


@pytest.mark.parametrize("seed", range(5))
def test_one_call_makes_a_test_part_disjoint_from_every_fold(uneven, seed):
    """Test part and K folds in one call: the test patients never appear in any fold's train or val,
    every other stack is validated exactly once, both classes are in the test part."""
    split = make_splits(uneven, folds=3, test_fraction=0.25, seed=seed)
    folds = split["folds"]
    test = set(folds[0]["test"])
    assert test and {uneven.meta(s).label for s in test} == {"SAIN", "MALADE"}
    test_patients = groups_of(uneven, test)
    for f in folds:
        assert set(f["test"]) == test
        assert not (set(f["train"]) | set(f["val"])) & test
        assert not (groups_of(uneven, f["train"]) | groups_of(uneven, f["val"])) & test_patients
        assert sorted(f["train"] + f["val"] + f["test"]) == sorted(uneven.stack_ids)
    vals = sorted(s for f in folds for s in f["val"])
    assert vals == sorted(set(uneven.stack_ids) - test)


def test_check_split_refuses_a_test_part_that_leaks_into_a_fold(uneven):
    split = make_splits(uneven, folds=3, test_fraction=0.25, seed=0)
    folds = json.loads(json.dumps(split["folds"]))
    folds[1]["test"].pop()  # fold 1 holds out one stack fewer
    with pytest.raises(SplitError, match="different test parts"):
        check_split({"folds": folds}, uneven)
    folds = json.loads(json.dumps(split["folds"]))
    patient = uneven.meta(folds[0]["test"][0]).group
    mates = [s for s in uneven.stack_ids if uneven.meta(s).group == patient]
    if len(mates) > 1:  # a patient split between the test part and a fold's train part
        for f in folds:
            f["test"] = [s for s in f["test"] if s != mates[-1]]
        folds[2]["train"] = [*folds[2]["train"], mates[-1]]
        folds[2]["val"] = [s for s in folds[2]["val"] if s != mates[-1]]
        with pytest.raises(SplitError, match=r"p01.* is in parts test, train|held-out test part"):
            check_split({"folds": folds}, uneven)


@pytest.fixture(scope="module")
def small_lab(tmp_path_factory):
    """6 stacks, 3 per class, one patient each: what a small lab starts with."""
    path = tmp_path_factory.mktemp("lab") / "s.zarr"
    for i in range(6):
        write_array(path, f"s{i}", np.full((3, 8, 16, 16), i + 1, np.uint8), label="MALADE" if i % 2 else "SAIN",
                    group=f"p{i}", chunk_zyx=(8, 16, 16), shard_zyx=(8, 16, 16))
    return path


@pytest.mark.parametrize("args, says", [
    (["--folds", "5"], "cannot be split into 5 stratified group folds|holds only"),
    (["--val-fraction", "0.2"], "the val part cannot be split into 5 stratified group folds"),
    (["--val-fraction", "0.9"], "--val-fraction 0.9: .* would give 0.5"),
    (["--val-fraction", "0.7"], "--val-fraction 0.7: .* would give 0.5"),
    (["--test-fraction", "0.6", "--val-fraction", "0.2"], "train part holds only 1 (SAIN|MALADE)"),
])
def test_impossible_splits_of_a_small_dataset_are_one_line(small_lab, tmp_path, capsys, args, says):
    out = tmp_path / "splits.json"
    assert main(["split", str(small_lab), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    import re
    assert re.search(says, err), err
    assert not out.exists()


def test_a_fraction_near_one_over_k_is_honoured(store):
    """0.3 is one of 3 folds (0.333); 0.5 one of 2: the part holds about that share of the patients."""
    for fraction in (0.3, 0.5):
        val = make_splits(store, val_fraction=fraction)["folds"][0]["val"]
        assert abs(len(val) / 16 - fraction) <= 0.1


def test_a_part_with_one_class_is_refused_unless_allowed(tmp_path):
    """All MALADE stacks belong to one patient: whichever part gets that patient, the other has no MALADE."""
    path = tmp_path / "s.zarr"
    for i in range(6):
        write_array(path, f"s{i}", np.full((3, 8, 16, 16), i + 1, np.uint8), label="MALADE" if i < 2 else "SAIN",
                    group="p0" if i < 2 else f"p{i}", chunk_zyx=(8, 16, 16), shard_zyx=(8, 16, 16))
    with pytest.raises(InputError, match="part holds only [0-9]+ SAIN.*--allow-one-class"):
        make_splits(path, val_fraction=0.5)
    with pytest.warns(UserWarning, match="holds only"):
        split = make_splits(path, val_fraction=0.5, allow_one_class=True)
    fold = split["folds"][0]
    assert {"s0", "s1"} <= set(fold["train"]) or {"s0", "s1"} <= set(fold["val"])


def test_training_warns_when_validation_holds_one_class(small_lab):
    from stacktrain.train.data import one_class_warning
    st = Store(small_lab)
    assert one_class_warning(st, ["s0", "s1"], ["s2", "s3"]) is None
    assert "validation part holds only SAIN" in one_class_warning(st, ["s0", "s1"], ["s2", "s4"])
