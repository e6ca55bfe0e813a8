"""Checkpoints: full round trip (model, optimizer, scaler, early stopping, RNGs), weights-only, refusals."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from stacktrain.train.checkpoint import (
    BEST,
    LAST,
    CheckpointError,
    checkpoint_paths,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from stacktrain.train.config import TrainConfig, config_to_dict
from stacktrain.train.early_stopping import EarlyStopping
from stacktrain.train.models import build_model


def trained(seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet3d18", tiny=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loss = model(torch.randn(2, 3, 16, 32, 32)).sum()
    loss.backward()
    opt.step()
    stopper = EarlyStopping(patience=5)
    stopper.step(0.4, 0)
    stopper.step(0.3, 1)
    return model, opt, stopper


def draws():
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_round_trip_restores_everything(tmp_path):
    model, opt, stopper = trained()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    path = checkpoint_paths(tmp_path)["last"]
    assert path.name == LAST and checkpoint_paths(tmp_path)["best"].name == BEST
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(path, model=model, optimizer=opt, scaler=scaler, epoch=1, early_stopping=stopper,
                    config=config_to_dict(TrainConfig()), model_name="resnet3d18", model_tiny=True)
    expected = draws()
    assert [p.name for p in tmp_path.iterdir()] == [LAST]

    fresh, fresh_opt, _ = trained(seed=99)
    fresh_stopper, fresh_scaler = EarlyStopping(patience=5), torch.amp.GradScaler("cpu")
    ckpt = load_checkpoint(path, model_name="resnet3d18", model_tiny=True)
    draws()  # move the streams on: restore must bring them back
    epoch = restore(ckpt, model=fresh, optimizer=fresh_opt, scaler=fresh_scaler, early_stopping=fresh_stopper)
    assert epoch == 1 and draws() == expected
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"])
    assert fresh_stopper.state_dict() == stopper.state_dict() and fresh_stopper.best_epoch == 0
    assert fresh_scaler.get_scale() == 1024.0
    assert ckpt["config"] == config_to_dict(TrainConfig())


def test_checkpoint_from_another_model_names_both(tmp_path):
    model, opt, stopper = trained()
    path = tmp_path / LAST
    save_checkpoint(path, model=model, optimizer=opt, scaler=None, epoch=0, early_stopping=stopper,
                    config={}, model_name="resnet3d18", model_tiny=True)
    with pytest.raises(CheckpointError, match=r"saved from model 'resnet3d18' \(tiny\).*builds 'resnet3d50'"):
        load_checkpoint(path, model_name="resnet3d50", model_tiny=True)
    with pytest.raises(CheckpointError, match=r"'resnet3d18' \(tiny\).*builds 'resnet3d18' \(full\)"):
        load_checkpoint(path, model_name="resnet3d18", model_tiny=False)
    other = build_model("resnet3d18", tiny=True, options={"stem_stride": 2})  # same name, same shapes
    restore(load_checkpoint(path), model=other, rng=False)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        restore(load_checkpoint(path), model=build_model("resnet3d50", tiny=True), rng=False)


def test_unreadable_and_unsafe_files(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        load_checkpoint(tmp_path / LAST)
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="not a readable checkpoint, truncated or corrupt"):
        load_checkpoint(tmp_path / "trunc.pt")
    torch.save({"format_version": 1, "payload": np.dtype("float32")}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError, match=r"objects other than tensors.*weights_only=True"):
        load_checkpoint(tmp_path / "unsafe.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a stacktrain checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
