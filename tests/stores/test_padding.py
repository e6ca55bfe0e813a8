"""Honest padding: a real MR volume smaller than one patch, converted with --pad, keeps its own statistics,
patches, heatmap and compression ratio; the zeros `--pad` adds count nowhere. Older stores still open.

The volume is the first of nibabel's shipped `example4d.nii.gz` (an EPI MR series of 128x96x24 voxels),
cropped to 117x90x15 (fewer slices than half the padded depth; stats cells at its edges partly padding)
and written as a uint16 NIfTI (its int16 values are all >= 0) so that it is stored as is.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from rich.console import Console

from stacktrain.cli import main
from stacktrain.errors import StoreError
from stacktrain.pipelines.config import PatchConfig
from stacktrain.pipelines.normalize import channel_mean_std
from stacktrain.pipelines.patches import build_index
from stacktrain.stores.info import summarize
from stacktrain.stores.layout import PERCENTILES, STATS_CELL_ZYX, StackMeta
from stacktrain.stores.reader import Store
from stacktrain.testing import write_array
from stacktrain.train.checkpoint import save_checkpoint
from stacktrain.train.config import config_to_dict
from stacktrain.train.models import build_model
from stacktrain.train.predict import _display_slice, predict
from stacktrain.train.results import load_results
from tests.support import tiny_config

CROP = (15, 90, 117)  # z, y, x kept of the volume: off the 8x32x32 stats cells, so edge cells are partial
VALID = CROP
PADDED = (32, 256, 256)  # the default --min-patch


def mr_volume(t: int = 0) -> tuple[np.ndarray, nib.Nifti1Image]:
    """Volume `t` of nibabel's example4d, cropped to CROP, as (z, y, x) uint16, and its image (NIfTI axes
    x, y, z)."""
    image = nib.load(Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz")
    z, y, x = CROP
    xyz = np.asanyarray(image.dataobj)[:x, :y, :z, t]
    assert xyz.min() >= 0  # uint16 keeps every value
    return xyz.transpose(2, 1, 0).astype(np.uint16), nib.Nifti1Image(xyz.astype(np.uint16), image.affine)


def convert_padded(root: Path, rows: list[tuple[int, str, str, str]], *extra: str) -> Path:
    """Convert (volume t, stack_id, label, group) rows with --pad --replicate-channels; returns the store."""
    lines = ["path,stack_id,label,group"]
    for t, sid, label, group in rows:
        if not (root / f"mr{t}.nii").exists():
            nib.save(mr_volume(t)[1], root / f"mr{t}.nii")
        lines.append(f"mr{t}.nii,{sid},{label},{group}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    store = root / "store.zarr"
    assert main(["convert", str(root / "manifest.csv"), "--out", str(store), "--pad", "--replicate-channels",
                 "--workers", "1", "--no-progress", *extra]) == 0
    return store


@pytest.fixture(scope="module")
def padded(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """One real MR stack of 24x96x128 padded to 32x256x256, and its source voxels (z, y, x)."""
    root = tmp_path_factory.mktemp("padded")
    return convert_padded(root, [(0, "mr", "MALADE", "p0")]), mr_volume(0)[0]


def test_store_records_the_valid_shape_and_the_source_size(padded):
    store, source = padded
    meta = Store(store).meta("mr")
    assert meta.shape == (3, *PADDED) and meta.valid_zyx == VALID == source.shape
    assert meta.source_bytes == (store.parent / "mr0.nii").stat().st_size
    voxels = Store(store).read("mr")
    z, y, x = VALID
    assert all(np.array_equal(voxels[ch, :z, :y, :x], source) for ch in range(3))
    assert voxels.sum() == 3 * int(source.sum(dtype=np.int64))  # everything else is --pad's zeros


def test_percentiles_and_sums_are_those_of_the_source(padded):
    store, source = padded
    st = Store(store)
    meta = st.meta("mr")
    for p in PERCENTILES:  # the histogram's percentile is numpy's inverted-CDF one, exactly
        assert meta.percentiles[f"p{p:g}"] == [float(np.percentile(source, p, method="inverted_cdf"))] * 3
    # the problem: over the padded voxels the 99th percentile falls far below the source's
    assert np.percentile(st.read("mr")[0], 99, method="inverted_cdf") < 0.9 * meta.percentiles["p99"][0]
    assert meta.n_voxels == source.size
    assert meta.channel_sum == [float(source.sum(dtype=np.int64))] * 3
    assert meta.channel_sumsq == [float((source.astype(np.int64) ** 2).sum())] * 3
    mean, std = channel_mean_std(st, ["mr"])  # meanstd normalisation from the stored sums
    assert mean == pytest.approx([source.mean()] * 3, rel=1e-12)
    assert std == pytest.approx([source.std()] * 3, rel=1e-9)


def _cell_reference(source: np.ndarray, padded_zyx=PADDED) -> tuple[np.ndarray, np.ndarray]:
    """Foreground fraction (> 0) and mean per stats cell of the padded grid over the voxels of `source`
    in each cell; 0 for cells without any."""
    grid = tuple(-(-n // k) for n, k in zip(padded_zyx, STATS_CELL_ZYX))
    fg, mean = np.zeros(grid), np.zeros(grid)
    for cell in np.ndindex(*grid):
        block = source[tuple(slice(i * k, (i + 1) * k) for i, k in zip(cell, STATS_CELL_ZYX))]
        if block.size:
            fg[cell], mean[cell] = (block > 0).mean(), block.mean()
    return fg, mean


def test_cell_statistics_cover_only_valid_voxels(padded):
    store, source = padded
    stats = Store(store).stats("mr")
    fg, mean = _cell_reference(source)
    np.testing.assert_allclose(stats["foreground"], fg, rtol=1e-6)
    for ch in range(3):
        np.testing.assert_allclose(stats["mean"][ch], mean, rtol=1e-6)
    gz, gy, gx = (-(-n // k) for n, k in zip(VALID, STATS_CELL_ZYX))
    assert not stats["foreground"][gz:].any() and not stats["foreground"][:, gy:].any()
    assert stats["foreground"][:gz, :gy, :gx].max() > 0.9
    # the problem: counted over the padded voxels, the partial edge cells' fractions come out lower
    over_padding, _ = _cell_reference(Store(store).read("mr")[0])
    edge = (over_padding < fg - 0.1)
    assert edge.any() and not edge[: VALID[0] // 8, : VALID[1] // 32, : VALID[2] // 32].any()


@pytest.mark.parametrize("dtype, valid", [
    (np.uint8, (13, 50, 70)),  # off the cells on every axis
    (np.uint16, (13, 50, 70)),
    (np.uint8, (16, 64, 96)),  # on the cells: whole cells of padding only
    (np.uint8, (40, 96, 96)),  # the whole shape: nothing padded
], ids=["uint8-partial-cells", "uint16-partial-cells", "uint8-whole-cells", "unpadded"])
def test_slab_statistics_of_a_padded_array(tmp_path, dtype, valid):
    """The writer's statistics of a zero-padded array equal numpy's over its valid region (synthetic data,
    slabs that start inside and past the valid region)."""
    rng = np.random.default_rng(3)
    source = rng.integers(0, np.iinfo(dtype).max, (3, *valid), dtype=dtype, endpoint=True)
    source[:, :, :10] = 0  # some background, so foreground fractions differ per cell
    arr = np.zeros((3, 40, 96, 96), dtype)
    arr[:, :valid[0], :valid[1], :valid[2]] = source
    meta = write_array(tmp_path / "s.zarr", "a", arr, valid_zyx=valid, chunk_zyx=(8, 32, 32), shard_zyx=(8, 32, 32))
    assert meta.valid_zyx == valid and meta.n_voxels == math.prod(valid)
    for p in PERCENTILES:
        assert meta.percentiles[f"p{p:g}"] == [float(np.percentile(c, p, method="inverted_cdf")) for c in source]
    assert meta.channel_sum == [float(c.sum(dtype=np.int64)) for c in source]
    assert meta.channel_sumsq == [float((c.astype(np.int64) ** 2).sum()) for c in source]
    stats = Store(tmp_path / "s.zarr").stats("a")
    fg, _ = _cell_reference((source > 0).any(axis=0), arr.shape[1:])
    np.testing.assert_allclose(stats["foreground"], fg, rtol=1e-6)
    for ch in range(3):
        np.testing.assert_allclose(stats["mean"][ch], _cell_reference(source[ch], arr.shape[1:])[1], rtol=1e-6)


def test_a_valid_region_outside_the_shape_is_refused(tmp_path):
    with pytest.raises(StoreError, match=r"valid region .* must lie inside the shape"):
        write_array(tmp_path / "s.zarr", "a", np.zeros((3, 8, 32, 32), np.uint8), valid_zyx=(9, 32, 32))
    assert not (tmp_path / "s.zarr" / "a").exists()


@pytest.mark.parametrize("size, foreground_min, kept", [
    ((16, 64, 64), 0.0, 4),  # of 32 grid patches, 28 lie wholly in padding
    ((16, 64, 64), 0.14, 3),
    ((32, 256, 256), 0.0, 1),  # smaller than one patch: the patch at the origin stays
    ((32, 256, 256), 0.03, 1),
], ids=["grid", "grid-foreground-filter", "one-patch", "one-patch-foreground-filter"])
def test_patches_wholly_in_padding_are_never_indexed(padded, size, foreground_min, kept):
    store, source = padded
    index = build_index(Store(store), ["mr"], PatchConfig(size=size, foreground_min=foreground_min))
    foreground = np.zeros(PADDED, bool)  # --pad's zeros are background
    foreground[tuple(slice(0, n) for n in VALID)] = source > 0
    grid = [(z, y, x) for z in range(0, PADDED[0], size[0]) for y in range(0, PADDED[1], size[1])
            for x in range(0, PADDED[2], size[2])]
    want = [p for p in grid if all(np.less(p, VALID)) and  # the patches aligned with the cells: exact fractions
            foreground[tuple(slice(o, o + n) for o, n in zip(p, size))].mean() >= foreground_min]
    assert [tuple(p) for p in index.position.tolist()] == want and len(want) == kept
    frac = index.padded_fraction(index.stack, index.position)
    inside = np.prod(np.minimum(index.position + size, VALID) - index.position, axis=1)
    np.testing.assert_allclose(frac, 1 - inside / math.prod(size))
    assert 0 < frac.min() and frac.max() < 1  # 15 slices: every patch kept is partly padding, none wholly


def test_info_reports_the_source_bytes_and_honest_ratios(padded, capsys):
    store, _ = padded
    assert main(["info", str(store), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["stacks"][0]
    source = (store.parent / "mr0.nii").stat().st_size
    assert row["valid_zyx"] == list(VALID) and row["source_bytes"] == source
    assert row["raw_bytes"] == 3 * math.prod(VALID) * 2  # the valid region, not the padded shape
    assert row["source_ratio"] == pytest.approx(source / row["stored_bytes"], abs=1e-3)
    assert row["ratio"] == pytest.approx(row["raw_bytes"] / row["stored_bytes"], abs=1e-3)
    assert row["ratio"] < 3 * math.prod(PADDED) * 2 / row["stored_bytes"] / 5  # what it reported before
    assert main(["info", str(store)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if " mr " in line)
    assert f"{'x'.join(map(str, VALID))} valid" in line
    assert f"{source / 1e6:,.2f}" in line and f"{row['source_ratio']:.2f}x" in line


def test_an_old_store_without_the_fields_still_opens(padded, tmp_path):
    store, _ = padded
    old = tmp_path / "old.zarr"
    assert main(["export", str(store), "--out", str(old), "--codec", "lz4"]) == 0
    assert Store(old).meta("mr").valid_zyx == VALID  # export keeps the valid region
    path = old / "mr" / "zarr.json"
    doc = json.loads(path.read_text())
    for key in ("valid_zyx", "source_bytes"):
        del doc["attributes"]["stacktrain"][key]
    path.write_text(json.dumps(doc))
    meta = Store(old).meta("mr")
    assert meta.valid_zyx is None and meta.valid == PADDED and meta.n_voxels == math.prod(PADDED)
    assert StackMeta.from_dict({k: v for k, v in meta.to_dict().items() if k != "valid_zyx"}) == meta
    assert len(build_index(Store(old), ["mr"], PatchConfig(size=(16, 64, 64)))) == 32  # no region known
    row = summarize(old)["stacks"][0]
    assert row["source_bytes"] is None and row["source_ratio"] is None and row["valid_zyx"] == list(PADDED)
    assert main(["info", str(old)]) == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Four real MR stacks (two volumes x two patients each) padded to 32x128x128, a split, and one
    epoch of the tiny model on 8x64x64 patches (8 per stack, of which 7 are partly padded)."""
    from stacktrain.train.loop import train
    from stacktrain.train.split import make_splits, write_split
    root = tmp_path_factory.mktemp("trained")
    rows = [(0, "a0", "SAIN", "p0"), (1, "a1", "MALADE", "p1"), (1, "b1", "SAIN", "p2"), (0, "b0", "MALADE", "p3")]
    store = convert_padded(root, rows, "--min-patch", "32", "128", "128")
    with warnings.catch_warnings():  # whatever parts it draws (one class or not): the folds are set below
        warnings.simplefilter("ignore")
        split = make_splits(store, val_fraction=0.5, seed=0, allow_one_class=True)
    split = {**split, "folds": [{"train": ["a0", "a1"], "val": ["b1", "b0"]}]}
    split.pop("sha256", None)
    write_split(split, root / "split.json")
    cfg = tiny_config(store, root / "split.json", "patch.size=[8, 64, 64]", "train.epochs=1")
    train(cfg, run_dir=root / "run")
    return store, root / "run", cfg


def test_training_results_flag_partly_padded_samples(trained):
    store, run, _ = trained
    results = load_results(run / "training_results.json", validate=True)  # the schema has the field
    samples = results.epochs[0]["samples"]
    assert len(samples) == 2 * 8 and {s["stack_id"] for s in samples} == {"b0", "b1"}
    for s in samples:
        z, y, x = s["position"]
        assert z < VALID[0] and y < VALID[1] and x < VALID[2]  # nothing wholly in padding is evaluated
        inside = math.prod(min(p + n, v) - p for p, n, v in zip(s["position"], (8, 64, 64), VALID))
        assert s.get("padded_fraction", 0.0) == pytest.approx(1 - inside / (8 * 64 * 64))
    flagged = [s["position"] for s in samples if "padded_fraction" in s]
    assert len(flagged) == 2 * 7 and [0, 0, 0] not in flagged  # all but the one at the origin
    assert all(v["n_patches"] == 8 for v in results.epochs[0]["volumes"])


def test_heatmap_shows_the_valid_region(trained, tmp_path):
    store, run, cfg = trained
    torch.manual_seed(0)
    model = build_model("resnet3d18", tiny=True)
    ckpt = tmp_path / "best.pt"
    save_checkpoint(ckpt, model=model, optimizer=None, scaler=None, epoch=0, early_stopping=None,
                    config=config_to_dict(cfg), model_name="resnet3d18", model_tiny=True)
    report = predict(ckpt, store, tmp_path / "pred", stacks=["a0"], console=Console(file=io.StringIO()))
    assert len(report["patches"]) == 8 and sum("padded_fraction" in p for p in report["patches"]) == 7
    assert not Store(store).read("a0", ((16, 17), (0, 128), (0, 128))).any()  # the padded mid-slice it showed
    image, mid = _display_slice(Store(store), "a0")
    assert image.shape == (*VALID[1:], 3) and mid == VALID[0] // 2  # not the padded 128x128, nor a zero slice
    assert image.max() > 0.5
    assert (tmp_path / "pred" / "heatmaps" / "a0.png").stat().st_size > 0
