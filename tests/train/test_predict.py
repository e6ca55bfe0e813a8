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

    # the probabilities as OME-Zarr layers over each stack: valid images, on the stack's grid
    import zarr
    from ome_zarr_models.v05.image import Image
    for sid in chosen:
        group = zarr.open_group(out / "probabilities.zarr" / sid, mode="r")
        (ms,) = Image.from_zarr(group).ome_attributes.multiscales
        scale = ms.datasets[0].coordinateTransformations[0].scale
        spacing = st.meta(sid).spacing_zyx or (1.0, 1.0, 1.0)
        assert list(scale) == pytest.approx([p * s for p, s in zip(PATCH, spacing)])  # one voxel per patch
        volume = group["0"][:]
        assert volume.shape == tuple(n // p for n, p in zip(st.meta(sid).shape[1:], PATCH))
        for row in (r for r in patches if r["stack_id"] == sid):
            cell = tuple(int(row[k]) // p for k, p in zip("zyx", PATCH))
            assert volume[cell] == pytest.approx(float(row["probability"]), abs=1e-6)

    predict(ckpt, store, out, stacks=chosen[1:], console=Console(file=io.StringIO()))  # again, into the same DIR
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == [f"{chosen[1]}.png"]  # no stale heatmap
    assert sorted(p.name for p in (out / "probabilities.zarr").iterdir() if p.is_dir()) == [chosen[1]]


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


@pytest.mark.parametrize("flags, words", [
    pytest.param(["--device", "cuda"], "--device cuda: torch sees no CUDA device", id="device"),
    pytest.param(["--loader", "dali"], "--loader dali decodes on the GPU", id="loader"),
    pytest.param(["--batch-size", "0"], "--batch-size 0: give at least 1", id="batch-size"),
])
def test_predicts_own_flags_are_named_in_its_errors(setup, tmp_path, capsys, flags, words):
    """On this CPU machine: predict's flags, not the training config's keys (train.device, loader.loader)."""
    store, ckpt, _ = setup
    assert main(["predict", str(ckpt), str(store), "--out", str(tmp_path / "x"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "train." not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_heatmap_contrast_comes_from_the_stored_percentiles(tmp_path):
    """16-bit data around 1000-3000 (a real microscope's range) is not shown black: the display window is
    the stack's stored 1st-99th percentile, not the dtype's 0-65535."""
    from stacktrain.testing import write_array
    from stacktrain.train.predict import _display_slice
    rng = np.random.default_rng(0)
    arr = rng.integers(1000, 3000, size=(3, 8, 32, 32)).astype(np.uint16)
    write_array(tmp_path / "s.zarr", "u16", arr)
    image, mid = _display_slice(Store(tmp_path / "s.zarr"), "u16")
    assert mid == 4 and image.shape == (32, 32, 3)
    assert 0.3 < image.mean() < 0.7 and image.min() == 0.0 and image.max() == 1.0
