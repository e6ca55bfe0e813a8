"""`stacktrain predict`: CSV/JSON agree with each other and with the model run by hand; heatmaps exist."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from rich.console import Console

from stacktrain.cli import main
from stacktrain.stores.reader import Store
from stacktrain.train.checkpoint import save_checkpoint
from stacktrain.train.config import config_to_dict
from stacktrain.train.models import build_model
from stacktrain.train.predict import predict, probability_map
from tests.support import PATCH, tiny_config, tiny_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A store and a checkpoint of an untrained tiny model (prediction does not need a trained one)."""
    root = tmp_path_factory.mktemp("predict")
    store, splits = tiny_data(root)
    torch.manual_seed(1)
    model = build_model("resnet3d18", tiny=True)
    ckpt = root / "best.pt"
    save_checkpoint(ckpt, model=model, optimizer=None, scaler=None, epoch=3, early_stopping=None,
                    config=config_to_dict(tiny_config(store, splits)), model_name="resnet3d18", model_tiny=True)
    return store, ckpt, model.eval()


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_writes_consistent_csv_json_and_heatmaps(setup, tmp_path):
    store, ckpt, model = setup
    st = Store(store)
    chosen = st.stack_ids[:2]
    out = tmp_path / "pred"
    report = predict(ckpt, store, out, stacks=chosen, console=Console(file=io.StringIO()))

    patches, stacks = _rows(out / "patches.csv"), _rows(out / "stacks.csv")
    assert [r["stack_id"] for r in stacks] == chosen
    assert len(patches) == 4 * len(chosen)  # 16x64x64 stacks hold 4 patches of 16x32x32
    for row in stacks:
        mine = [float(p["probability"]) for p in patches if p["stack_id"] == row["stack_id"]]
        assert float(row["aggregated_probability"]) == pytest.approx(np.mean(mine), abs=1e-12)
        assert int(row["n_patches"]) == len(mine)
        assert int(row["predicted_label"]) == int(np.mean(mine) >= 0.5)
        assert row["predicted_class"] == ("MALADE" if row["predicted_label"] == "1" else "SAIN")
        assert int(row["label"]) == st.meta(row["stack_id"]).label_index
    saved = json.loads((out / "predictions.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["epoch"] == 3 and [v["stack_id"] for v in saved["stacks"]] == chosen
    assert [p["probability"] for p in saved["patches"]] == [float(p["probability"]) for p in patches]

    # The model by hand on two patches read straight from the store (normalize = scale: x / 255).
    for row in (patches[0], patches[-1]):
        z, y, x = (int(row[k]) for k in "zyx")
        box = tuple((a, a + n) for a, n in zip((z, y, x), PATCH))
        image = torch.from_numpy(st.read(row["stack_id"], box).astype(np.float32) / 255.0)[None]
        with torch.no_grad():
            expected = torch.sigmoid(model(image))[0, 0].item()
        assert float(row["probability"]) == pytest.approx(expected, abs=1e-5)

    for sid in chosen:
        png = imread(out / "heatmaps" / f"{sid}.png")
        assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > png.shape[0]  # two panels side by side
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == [f"{sid}.png" for sid in chosen]


def test_probability_map_takes_the_max_of_covering_patches():
    samples = [{"position": [0, 0, 0], "probability": 0.2}, {"position": [8, 0, 2], "probability": 0.7},
               {"position": [0, 2, 0], "probability": 0.4}]
    got = probability_map(samples, (8, 2, 2), (4, 5))
    nan = np.nan
    expected = np.array([[0.2, 0.2, 0.7, 0.7, nan],
                         [0.2, 0.2, 0.7, 0.7, nan],
                         [0.4, 0.4, nan, nan, nan],
                         [0.4, 0.4, nan, nan, nan]])
    np.testing.assert_array_equal(got, expected)


def test_unknown_stack_is_one_clear_error(setup, tmp_path, capsys):
    store, ckpt, _ = setup
    assert main(["predict", str(ckpt), str(store), "--out", str(tmp_path / "x"), "--stacks", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no stack 'nope'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
