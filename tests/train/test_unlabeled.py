"""Unlabeled stacks: converted with --allow-unlabeled, left out of splits, refused for training, and
predicted with decisions but no metrics (metrics over the labelled stacks when a store mixes both)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from rich.console import Console

from stacktrain.cli import main
from stacktrain.errors import ConversionFailed, InputError, SplitError
from stacktrain.stores.convert import ConvertOptions, convert
from stacktrain.stores.intensity import mapping_of
from stacktrain.stores.manifest import read_manifest
from stacktrain.stores.reader import Store
from stacktrain.stores.synth import synth
from stacktrain.train.checkpoint import save_checkpoint
from stacktrain.train.config import config_to_dict
from stacktrain.train.evaluator import binary_metrics
from stacktrain.train.models import build_model
from stacktrain.train.predict import predict
from stacktrain.train.split import check_split, make_splits, write_split
from tests.support import PATCH, tiny_config

UNLABELED_IDS = ("stack001", "stack004", "stack007")


def _blank_labels(labels, ids, *, drop_group=False):
    rows = list(csv.DictReader(labels.open()))
    for r in rows:
        if r["stack_id"] in ids:
            r["label"] = ""
            if drop_group:
                r["group"] = ""
    with labels.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return labels


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """10 synthetic stacks, 3 of them unlabeled (one without a group), converted into one store, and an
    untrained tiny model's checkpoint (prediction does not need a trained one)."""
    root = tmp_path_factory.mktemp("unlabeled")
    labels = synth(root / "raw", stacks=10, shape_zyx=(16, 64, 64), seed=2)
    _blank_labels(labels, UNLABELED_IDS[:2])
    _blank_labels(labels, UNLABELED_IDS[2:], drop_group=True)
    store = root / "store.zarr"
    convert(labels, store, ConvertOptions(min_patch_zyx=PATCH, allow_unlabeled=True, workers=1))
    split = root / "split.json"
    write_split(make_splits(store, val_fraction=0.3, seed=0), split)
    torch.manual_seed(0)
    model = build_model("resnet3d18", tiny=True)
    ckpt = root / "best.pt"
    save_checkpoint(ckpt, model=model, optimizer=None, scaler=None, epoch=0, early_stopping=None,
                    config=config_to_dict(tiny_config(store, split)), model_name="resnet3d18", model_tiny=True,
                    data={"intensity": mapping_of(store)})  # what training records of its store
    return root, labels, store, split, ckpt


def test_an_empty_label_needs_allow_unlabeled(mixed):
    _, labels, *_ = mixed
    with pytest.raises(InputError, match="empty label; give one of SAIN, MALADE, or pass --allow-unlabeled"):
        read_manifest(labels)


def test_a_prediction_manifest_needs_only_path_and_stack_id(tmp_path, mixed):
    _, labels, *_ = mixed
    raw = labels.parent
    (tmp_path / "new.csv").write_text("path,stack_id\n" + f"{raw / 'stack000.tif'},new0\n")
    (row,) = read_manifest(tmp_path / "new.csv", allow_unlabeled=True)
    assert (row.label, row.group) == ("", "new0")
    with pytest.raises(InputError, match="missing column"):
        read_manifest(tmp_path / "new.csv")


def test_unlabeled_stacks_are_stored_and_left_out_of_splits(mixed):
    _, _, store, split, _ = mixed
    st = Store(store)
    assert {m.stack_id for m in st.stacks if m.label == ""} == set(UNLABELED_IDS)
    assert st.meta(UNLABELED_IDS[2]).group == UNLABELED_IDS[2] and st.meta(UNLABELED_IDS[0]).label_index == -1
    saved = json.loads(split.read_text())
    assert saved["unlabeled"] == sorted(UNLABELED_IDS)
    used = {s for fold in saved["folds"] for ids in fold.values() for s in ids}
    assert used.isdisjoint(UNLABELED_IDS) and len(used) == 7
    saved["folds"][0]["train"].append(UNLABELED_IDS[0])  # a hand-edited split that trains on one
    with pytest.raises(SplitError, match=f"unlabeled stack.*{UNLABELED_IDS[0]}"):
        check_split(saved, store)


def test_the_split_command_says_what_it_left_out(mixed, tmp_path, capsys):
    _, _, store, *_ = mixed
    assert main(["split", str(store), "--val-fraction", "0.3", "--out", str(tmp_path / "s.json")]) == 0
    assert "3 unlabeled stack(s) left out (for prediction only)" in capsys.readouterr().out


def test_predict_decides_unlabeled_stacks_and_scores_only_the_labelled(mixed, tmp_path):
    _, _, store, _, ckpt = mixed
    report = predict(ckpt, store, tmp_path / "all", console=Console(quiet=True))
    by_id = {v["stack_id"]: v for v in report["stacks"]}
    assert all(by_id[s]["label"] is None and by_id[s]["predicted_class"] in ("SAIN", "MALADE") for s in UNLABELED_IDS)
    known = [v for v in report["stacks"] if v["label"] is not None]
    want = binary_metrics(np.array([v["label"] for v in known]), np.array([v["aggregated_probability"] for v in known]))
    assert report["volume_metrics"] == want
    rows = {r["stack_id"]: r for r in csv.DictReader((tmp_path / "all" / "stacks.csv").open())}
    assert rows[UNLABELED_IDS[0]]["label"] == "" and rows["stack000"]["label"] in ("0", "1")
    only = predict(ckpt, store, tmp_path / "only", stacks=list(UNLABELED_IDS), console=Console(quiet=True))
    saved = json.loads((tmp_path / "only" / "predictions.json").read_text())
    assert only["volume_metrics"] is None and saved["patch_metrics"] is None and len(saved["stacks"]) == 3


def test_info_totals_the_unlabeled_stacks(mixed):
    from stacktrain.stores.info import summarize
    _, _, store, *_ = mixed
    totals = summarize(store)["totals"]
    assert totals["unlabeled"]["stacks"] == 3 and totals["all"]["stacks"] == 10
    assert totals["SAIN"]["stacks"] + totals["MALADE"]["stacks"] == 7


# -- raw inputs: converted the training store's way, then predicted ------------------------------------
def test_predict_on_a_raw_manifest_without_labels(mixed, tmp_path):
    root, labels, _, _, ckpt = mixed
    raw = labels.parent
    manifest = tmp_path / "new.csv"
    manifest.write_text(f"path,stack_id\n{raw / 'stack000.tif'},new0\n{raw / 'stack007.tif'},new3\n")
    out = tmp_path / "pred"
    report = predict(ckpt, manifest, out, console=Console(quiet=True))
    assert [v["stack_id"] for v in report["stacks"]] == ["new0", "new3"]
    assert all(v["label"] is None for v in report["stacks"]) and report["volume_metrics"] is None
    saved = json.loads((out / "predictions.json").read_text())
    assert saved["store"] is None and saved["inputs"] == [str(manifest)]
    assert not list(tmp_path.glob(".stacktrain-predict-*"))  # the temporary store is gone
    assert (out / "heatmaps" / "new0.png").is_file()


def test_predict_on_raw_files_keeps_the_store_it_names_with_the_models_mapping(mixed, tmp_path):
    root, labels, store, _, ckpt = mixed
    raw = labels.parent
    files = [raw / "stack000.tif", raw / "stack004.npy"]
    kept = tmp_path / "new.zarr"
    report = predict(ckpt, files, tmp_path / "pred", keep_store=kept, console=Console(quiet=True))
    assert [v["stack_id"] for v in report["stacks"]] == ["stack000", "stack004"] and report["store"] == str(kept)
    assert mapping_of(kept) == mapping_of(store)
    np.testing.assert_array_equal(Store(kept).read("stack000"), Store(store).read("stack000"))  # same bytes
    again = predict(ckpt, files, tmp_path / "pred2", keep_store=kept, console=Console(quiet=True))  # skips
    assert [v["aggregated_probability"] for v in again["stacks"]] == [v["aggregated_probability"]
                                                                       for v in report["stacks"]]


def test_predict_refuses_raw_stacks_of_another_bit_depth(mixed, tmp_path):
    _, _, _, _, ckpt = mixed  # trained on a uint8 store of values as they are
    deep = synth(tmp_path / "raw16", stacks=2, shape_zyx=(16, 64, 64), seed=3, dtype="uint16")
    with pytest.raises(ConversionFailed) as e:
        predict(ckpt, [deep.parent / "stack000.tif"], tmp_path / "pred", console=Console(quiet=True))
    message = e.value.report.outcomes[0].error
    assert "uint16" in message and "uint8" in message
    assert not (tmp_path / "pred" / "predictions.json").exists()


def test_the_predict_command_on_raw_files(mixed, tmp_path):
    import subprocess
    import sys
    _, labels, _, _, ckpt = mixed
    raw = labels.parent
    run = subprocess.run([sys.executable, "-m", "stacktrain", "predict", str(ckpt), str(raw / "stack003.nii.gz"),
                          str(raw / "stack001.ome.tif"), "--out", str(tmp_path / "pred"), "--workers", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader((tmp_path / "pred" / "stacks.csv").open()))
    assert [r["stack_id"] for r in rows] == ["stack003", "stack001"] and all(r["label"] == "" for r in rows)
