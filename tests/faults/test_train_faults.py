"""Bad input to training is one line, never a traceback: every numeric config key out of range (the cases are
checked against the config dataclasses, so a new key without a case fails), every kind of malformed
checkpoint in `predict` and in `train --resume`, and a split file made for another store."""

from __future__ import annotations

import dataclasses
import io
import typing
import zipfile

import numpy as np
import pytest
import torch

from stacktrain.errors import ConfigError, SplitError, StackTrainError
from stacktrain.testing import tissue, write_array
from stacktrain.train import checkpoint as ckpts
from stacktrain.train import loop
from stacktrain.train.config import SECTIONS, load_config
from stacktrain.train.models import build_model
from stacktrain.train.predict import predict
from stacktrain.train.split import check_split, load_split, make_splits, store_identity
from tests.faults.conftest import ONE_EPOCH
from tests.support import tiny_config

# -- config ranges -----------------------------------------------------------------------------------
BAD = {  # key -> out-of-range values (TOML literals), beyond the wrong-type case every numeric key gets
    "data.fold": ["-1"],
    "patch.size": ["[0, 32, 32]", "[16, -1, 32]"],
    "patch.stride": ["[0, 1, 1]"],
    "patch.foreground_min": ["-0.1", "inf"],
    "preprocess.mean": ["[nan, 0.0, 0.0]"],
    "preprocess.std": ["[0.0, 1.0, 1.0]", "[-1.0, 1.0, 1.0]", "[inf, 1.0, 1.0]"],
    "preprocess.percentile_low": ["-1", "101"],
    "preprocess.percentile_high": ["101", "-5"],
    "preprocess.jitter": ["-5"],
    "loader.batch_size": ["0"],
    "loader.workers": ["-1"],
    "loader.steps_per_epoch": ["-1"],
    "loader.prefetch": ["0"],
    "loader.seed": ["-1"],
    "optim.lr": ["0", "-1e-3", "nan", "inf"],
    "optim.weight_decay": ["-1", "nan"],
    "optim.pos_weight": ["0", "-2", "inf"],
    "train.epochs": ["0"],
    "train.patience": ["0"],
    "train.min_delta": ["-1", "nan"],
    "train.topk": ["0"],
    "train.seed": ["-1"],
    "train.log_interval": ["0"],
}


def _is_numeric(tp) -> bool:
    args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
    if typing.get_origin(tp) in (typing.Union, tuple, type(int | None)):
        return any(_is_numeric(a) for a in args)
    return tp in (int, float)


def numeric_keys() -> list[str]:
    return [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
            if _is_numeric(typing.get_type_hints(cls)[f.name])]


CASES = [(k, v) for k, values in BAD.items() for v in values] + [(k, '"abc"') for k in BAD]


def test_every_numeric_config_key_has_range_cases():
    assert sorted(numeric_keys()) == sorted(BAD)


@pytest.mark.parametrize("key,value", CASES, ids=[f"{k}={v}" for k, v in CASES])
def test_an_out_of_range_value_is_one_line_naming_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"{key}={value}"])
    message = str(err.value)
    assert key in message and "\n" not in message


def test_every_range_problem_is_reported_at_once():
    overrides = ["loader.workers=-1", "loader.prefetch=0", "optim.lr=nan", "preprocess.jitter=-5",
                 "preprocess.percentile_low=99", "preprocess.percentile_high=1", "train.epochs=0"]
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "\n" not in message and message.startswith("defaults: 6 problems")
    for key in ("loader.workers", "loader.prefetch", "optim.lr", "preprocess.jitter", "preprocess.percentile_low",
                "train.epochs"):
        assert key in message


def test_in_range_values_are_accepted():
    cfg = load_config(None, ["loader.workers=0", "preprocess.percentile_low=0.5", "preprocess.percentile_high=99.5",
                             "patch.foreground_min=1.0", "optim.weight_decay=0", "train.min_delta=0"])
    assert cfg.loader.workers == 0 and cfg.preprocess.percentile_high == 99.5


# -- malformed checkpoints -----------------------------------------------------------------------------
def _state(valid):
    return torch.load(valid, map_location="cpu", weights_only=True)


def _with(valid, dest, **change):
    state = _state(valid)
    for key, value in change.items():
        if value is KeyError:
            state.pop(key)
        else:
            state[key] = value
    torch.save(state, dest)


def _zip_not_torch(valid, dest):
    with zipfile.ZipFile(dest, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")


def _other_model(valid, dest):
    _with(valid, dest, model=build_model("resnet3d50", tiny=True).state_dict())


def _other_optimizer(valid, dest):
    other = build_model("resnet3d50", tiny=True)
    _with(valid, dest, optimizer=torch.optim.Adam(other.parameters()).state_dict())


def _config_bad_value(valid, dest):
    state = _state(valid)
    state["config"]["optim"]["lr"] = -1.0
    torch.save(state, dest)


DAMAGES = {
    "directory": lambda valid, dest: dest.mkdir(),
    "empty": lambda valid, dest: dest.write_bytes(b""),
    "truncated": lambda valid, dest: dest.write_bytes(valid.read_bytes()[: valid.stat().st_size // 2]),
    "random-bytes": lambda valid, dest: dest.write_bytes(np.random.default_rng(0).bytes(4096)),
    "zip-not-torch": _zip_not_torch,
    "a-tensor": lambda valid, dest: torch.save(torch.zeros(3), dest),
    "a-list": lambda valid, dest: torch.save([1, 2, 3], dest),
    "foreign-dict": lambda valid, dest: torch.save({"weights": torch.zeros(1)}, dest),
    "format-2": lambda valid, dest: _with(valid, dest, format_version=2),
    "pickled-code": lambda valid, dest: torch.save({"format_version": 1, "x": np.dtype("float32")}, dest),
    **{f"no-{key}": (lambda key: lambda valid, dest: _with(valid, dest, **{key: KeyError}))(key)
       for key in ("model_name", "model_tiny", "epoch", "config", "model", "rng")},
    "epoch-a-string": lambda valid, dest: _with(valid, dest, epoch="3"),
    "epoch-negative": lambda valid, dest: _with(valid, dest, epoch=-2),
    "tiny-a-string": lambda valid, dest: _with(valid, dest, model_tiny="yes"),
    "model-a-list": lambda valid, dest: _with(valid, dest, model=[1, 2]),
    "model-not-tensors": lambda valid, dest: _with(valid, dest, model={"conv.weight": 1}),
    "config-a-list": lambda valid, dest: _with(valid, dest, config=[1]),
    "rng-incomplete": lambda valid, dest: _with(valid, dest, rng={"python": [1]}),
    "another-models-state": _other_model,
    "config-bad-value": _config_bad_value,
}
RESUME_ONLY = {  # states predict never loads
    "another-models-optimizer": _other_optimizer,
    "rng-damaged": lambda valid, dest: _with(valid, dest, rng={**_state(valid)["rng"], "python": [3, [1], None]}),
    "early-stopping-damaged": lambda valid, dest: _with(valid, dest, early_stopping={"patience": 1}),
}


def assert_one_line(err, path):
    message = str(err.value)
    assert isinstance(err.value, StackTrainError) and "\n" not in message and str(path) in message, message


@pytest.mark.parametrize("damage", [*DAMAGES, "missing"])
def test_predict_with_a_malformed_checkpoint(damage, finished_run, data, tmp_path):
    bad = tmp_path / "bad.pt"
    if damage != "missing":
        DAMAGES[damage](finished_run / ckpts.BEST, bad)
    with pytest.raises(StackTrainError) as err:
        predict(bad, data[0], tmp_path / "out")
    assert_one_line(err, bad)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", [*DAMAGES, *RESUME_ONLY])
def test_resume_with_a_malformed_last_pt(damage, run_copy, data):
    last = run_copy / ckpts.LAST
    valid = run_copy / "valid.pt"
    last.rename(valid)
    {**DAMAGES, **RESUME_ONLY}[damage](valid, last)
    results_before = (run_copy / "training_results.json").read_bytes()
    with pytest.raises(StackTrainError) as err:
        loop.train(tiny_config(*data, ONE_EPOCH), run_dir=run_copy, resume=True)
    assert_one_line(err, last)
    assert (run_copy / "training_results.json").read_bytes() == results_before


def test_a_damaged_best_pt_is_rewritten_from_last_pt_on_resume(run_copy, data):
    (run_copy / ckpts.BEST).write_bytes(b"")  # epoch 0 is the best and the last: best.pt is last.pt's copy
    loop.train(tiny_config(*data, ONE_EPOCH), run_dir=run_copy, resume=True)
    assert (run_copy / ckpts.BEST).read_bytes() == (run_copy / ckpts.LAST).read_bytes()


# -- split identity ------------------------------------------------------------------------------------
def _store(path, labels, groups):
    for i, (label, group) in enumerate(zip(labels, groups)):
        write_array(path, f"s{i}", tissue((3, 8, 16, 16), seed=i), label=label, group=group,
                    chunk_zyx=(8, 16, 16), shard_zyx=(8, 16, 16))
    return path


LABELS = ["SAIN", "MALADE"] * 4
GROUPS = [f"p{i // 2}" for i in range(8)]
OTHER_STORES = {
    "a-label-changed": (["MALADE"] + LABELS[1:], GROUPS),
    "groups-changed": (LABELS, [f"q{i // 2}" for i in range(8)]),
    "a-stack-more": (LABELS + ["SAIN"], GROUPS + ["p9"]),
}


@pytest.fixture(scope="module")
def made_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    store = _store(root / "a.zarr", LABELS, GROUPS)
    return store, make_splits(store, val_fraction=0.5, seed=0)


@pytest.mark.parametrize("other", OTHER_STORES)
def test_a_split_of_another_store_is_refused_even_when_its_ids_overlap(other, made_split, tmp_path):
    store, split = made_split
    labels, groups = OTHER_STORES[other]
    other_store = _store(tmp_path / "b.zarr", labels, groups)
    with pytest.raises(SplitError, match="made for store .*a.zarr .*identity .*not for .*b.zarr.*remake the split"):
        check_split(split, other_store, "splits.json")


def test_the_same_stacks_elsewhere_are_the_same_store(made_split, tmp_path):
    store, split = made_split
    copy = _store(tmp_path / "copy.zarr", LABELS, GROUPS)
    assert store_identity(copy) == split["store_id"]
    check_split(split, copy)


def test_an_older_split_without_store_id_warns(made_split):
    store, split = made_split
    old = {k: v for k, v in split.items() if k != "store_id"}
    with pytest.warns(UserWarning, match="older split file without the identity of its store"):
        check_split(old, store)


def test_training_refuses_a_split_made_for_another_store(data, tmp_path):
    split = load_split(data[1])
    other = _store(tmp_path / "other.zarr", LABELS, GROUPS)
    with pytest.raises(SplitError, match="made for store"):
        loop.train(tiny_config(other, data[1], ONE_EPOCH), run_dir=tmp_path / "r")
    assert split["store_id"] == store_identity(data[0]) and not (tmp_path / "r").exists()


def test_a_checkpoint_saved_in_memory_first_matches_torch_save(finished_run):
    state = _state(finished_run / ckpts.LAST)
    buf = io.BytesIO()
    torch.save(state, buf)
    assert buf.getvalue()[:4] == ckpts.ZIP_MAGIC
