"""Bad input to `stacktrain train`: one clear line on stderr, exit code 2, nothing trained."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch

from stacktrain.cli import main
from stacktrain.stores.reader import Store
from stacktrain.train.checkpoint import LAST, save_checkpoint
from stacktrain.train.config import config_to_dict, save_config
from stacktrain.train.models import build_model
from stacktrain.train.results import RESULTS_NAME
from tests.support import tiny_config, tiny_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def config(data, tmp_path):
    path = tmp_path / "cfg.toml"
    save_config(tiny_config(*data), path)
    return path


def run_train(capsys, *args) -> str:
    """Run `stacktrain train ARGS`; assert exit 2 with one line on stderr; return that line."""
    assert main(["train", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def write_split(tmp_path, data, edit) -> str:
    split = json.loads(data[1].read_text())
    split.pop("sha256")  # edited by hand, as a user would
    edit(split["folds"][0])
    path = tmp_path / "edited-split.json"
    path.write_text(json.dumps(split))
    return f"data.split={path}"


def test_unknown_config_keys_list_the_valid_ones(config, tmp_path, capsys):
    err = run_train(capsys, config, "--set", "train.epoch=3", "--run-dir", tmp_path / "r")
    assert "unknown key train.epoch" in err and "valid keys of [train]: epochs, patience" in err
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace("[optim]\n", "[optim]\nlearning_rate = 0.1\n"))
    err = run_train(capsys, bad, "--run-dir", tmp_path / "r")
    assert "optim.learning_rate" in err and "valid keys of [optim]: lr, weight_decay, pos_weight" in err
    assert not (tmp_path / "r").exists()


def test_missing_store_and_unset_data(config, tmp_path, capsys):
    err = run_train(capsys, config, "--set", f"data.store={tmp_path / 'nowhere.zarr'}", "--run-dir", tmp_path / "r")
    assert "nowhere.zarr: store not found" in err
    err = run_train(capsys, config, "--set", "data.split=", "--run-dir", tmp_path / "r")
    assert "data.split is not set" in err
    assert not (tmp_path / "r").exists()


def test_empty_validation_part(config, data, tmp_path, capsys):
    def empty_val(fold):
        fold["train"] += fold["val"]
        fold["val"] = []
    err = run_train(capsys, config, "--set", write_split(tmp_path, data, empty_val), "--run-dir", tmp_path / "r")
    assert "part 'val' of fold 0 is empty" in err and "no validation set" in err


def test_split_leaks_are_refused(config, data, tmp_path, capsys):
    groups = defaultdict(list)
    for meta in Store(data[0]).stacks:
        groups[meta.group].append(meta.stack_id)
    a, b = next(ids for ids in groups.values() if len(ids) >= 2)[:2]

    def leak_patient(fold):
        for part in fold.values():
            part[:] = [s for s in part if s not in (a, b)]
        fold["train"].append(a)
        fold["val"].append(b)
    err = run_train(capsys, config, "--set", write_split(tmp_path, data, leak_patient), "--run-dir", tmp_path / "r")
    assert "group (patient)" in err and a in err and b in err and "train, val" in err

    def same_stack_twice(fold):
        fold["val"].append(fold["train"][0])
    err = run_train(capsys, config, "--set", write_split(tmp_path, data, same_stack_twice), "--run-dir", tmp_path / "r")
    assert "is in both 'train' and 'val'" in err


def test_resume_with_a_checkpoint_of_another_model(config, data, tmp_path, capsys):
    run_dir = tmp_path / "other"
    run_dir.mkdir()
    other = tiny_config(*data, "model.name=resnet3d50")
    save_checkpoint(run_dir / LAST, model=build_model("resnet3d50", tiny=True), optimizer=None, scaler=None,
                    epoch=0, early_stopping=None, config=config_to_dict(other), model_name="resnet3d50",
                    model_tiny=True)
    before = (run_dir / LAST).read_bytes()
    err = run_train(capsys, config, "--resume", run_dir)  # config says resnet3d18
    assert "saved from model 'resnet3d50' (tiny)" in err and "builds 'resnet3d18' (tiny)" in err
    assert (run_dir / LAST).read_bytes() == before


def test_existing_run_precision_and_device(config, tmp_path, capsys):
    run_dir = tmp_path / "taken"
    run_dir.mkdir()
    (run_dir / RESULTS_NAME).write_text("{}")
    err = run_train(capsys, config, "--run-dir", run_dir)
    assert "already holds a run" in err and "--resume" in err
    err = run_train(capsys, config, "--set", "train.precision=bf16", "--run-dir", tmp_path / "r")
    assert "train.precision = \"bf16\" on the CPU, which trains in fp32" in err
    if not torch.cuda.is_available():
        err = run_train(capsys, config, "--set", "train.device=cuda", "--run-dir", tmp_path / "r")
        assert "no CUDA device" in err
