"""DDP: `torchrun --nproc_per_node=2` (gloo, CPU) trains like one process with the same global batch.

Each rank gets every other sample of the global batch (pipelines/plans.py), DDP averages the
gradients, validation predictions are gathered before aggregation. BatchNorm would still differ
(each rank normalises over its half batch; SyncBatchNorm, which the loop uses on GPUs, does not run
on the CPU), so this test trains a tiny ResNet with GroupNorm, which is batch-independent.

Run as a module (`python -m tests.train.test_ddp ARGS`) it registers that model and runs `stacktrain ARGS`:
that is what torchrun starts on each rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stacktrain.train.models import MODELS, build_model

REPO = Path(__file__).resolve().parents[2]
MODEL = "test-resnet-groupnorm"


def resnet_groupnorm(tiny: bool = True) -> torch.nn.Module:
    """The tiny resnet3d18 with GroupNorm (2 groups) in place of every BatchNorm. (MONAI's ResNet
    `norm=` argument reaches only the stem: its _make_layer does not pass it on.)"""
    model = build_model("resnet3d18", tiny=True)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.BatchNorm3d):
                setattr(module, name, torch.nn.GroupNorm(2, child.num_features))
    return model


def _close(a: dict, b: dict, tol: float = 1e-4) -> None:
    """Two epoch entries agree up to float tolerance (labels exactly, away from the 0.5 threshold)."""
    assert a["epoch"] == b["epoch"]
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=tol)
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=tol)
    assert [(s["stack_id"], s["position"], s["label"]) for s in a["samples"]] == \
        [(s["stack_id"], s["position"], s["label"]) for s in b["samples"]]
    pa, pb = (np.array([s["probability"] for s in e["samples"]]) for e in (a, b))
    np.testing.assert_allclose(pa, pb, atol=tol)
    va, vb = (np.array([v["aggregated_probability"] for v in e["volumes"]]) for e in (a, b))
    np.testing.assert_allclose(va, vb, atol=tol)
    clear = np.abs(va - 0.5) > 10 * tol
    assert [v["predicted_label"] for v, c in zip(a["volumes"], clear) if c] == \
        [v["predicted_label"] for v, c in zip(b["volumes"], clear) if c]


@pytest.mark.slow  # one of the heaviest integration tests: `make test-slow` (CI) runs it
def test_two_gloo_ranks_equal_one_process(tmp_path, monkeypatch):
    from stacktrain.train.config import save_config
    from stacktrain.train.loop import train
    from stacktrain.train.results import load_results
    from tests.support import tiny_config, tiny_data

    monkeypatch.setitem(MODELS, MODEL, resnet_groupnorm)
    store, splits = tiny_data(tmp_path / "data")
    common = ["model.name=" + MODEL, "train.epochs=2"]
    one = load_results(train(tiny_config(store, splits, *common, "loader.batch_size=8"), run_dir=tmp_path / "one"))

    config_path = tmp_path / "ddp.toml"
    save_config(tiny_config(store, splits, *common, "loader.batch_size=4"), config_path)  # per rank
    ddp_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "tests.train.test_ddp", "train", str(config_path), "--run-dir", str(ddp_dir)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = load_results(ddp_dir / "training_results.json")

    assert two["environment"]["world_size"] == 2 and one["environment"]["world_size"] == 1
    assert len(two["epochs"]) == len(one["epochs"]) == 2
    for a, b in zip(two["epochs"], one["epochs"]):
        _close(a, b)
    assert len(list((ddp_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes
    assert proc.stderr.count("training test-resnet-groupnorm") == 1  # and alone logs


if __name__ == "__main__":  # one torchrun rank
    from stacktrain.cli import main

    MODELS[MODEL] = resnet_groupnorm
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))
