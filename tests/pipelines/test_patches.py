"""The patch index: grid positions per edge policy, foreground filter from stored statistics, errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stacktrain.errors import PipelineError
from stacktrain.pipelines.config import PatchConfig
from stacktrain.pipelines.patches import axis_positions, build_index
from stacktrain.stores.reader import Store
from stacktrain.testing import tissue, write_array


@pytest.mark.parametrize("extent, size, step, edge, want", [
    (20, 8, 8, "drop", [0, 8]),
    (20, 8, 8, "fit", [0, 8, 12]),
    (20, 8, 8, "pad", [0, 8, 16]),
    (16, 8, 8, "fit", [0, 8]),  # exact tiling: fit adds nothing
    (16, 8, 8, "pad", [0, 8]),
    (20, 8, 4, "drop", [0, 4, 8, 12]),  # overlapping stride
    (21, 8, 4, "fit", [0, 4, 8, 12, 13]),
    (21, 8, 4, "pad", [0, 4, 8, 12, 16]),
    (5, 8, 8, "pad", [0]),  # smaller than the patch: one padded patch
    (5, 8, 8, "fit", []),
])
def test_axis_positions(extent, size, step, edge, want):
    assert axis_positions(extent, size, step, edge).tolist() == want


def test_index_covers_every_stack_in_grid_order(small_store):
    path, arrays = small_store
    store = Store(path)
    index = build_index(store, store.stack_ids, PatchConfig(size=(8, 16, 16), edge="fit"))
    for i, (sid, arr) in enumerate(arrays.items()):
        rows = np.flatnonzero(index.stack == i)
        pos = index.position[rows]
        covered = np.zeros(arr.shape[1:], bool)
        for z, y, x in pos:
            covered[z:z + 8, y:y + 16, x:x + 16] = True
            assert z + 8 <= arr.shape[1] and y + 16 <= arr.shape[2] and x + 16 <= arr.shape[3]
        assert covered.all(), sid  # fit covers the whole stack
        assert [tuple(p) for p in pos] == sorted(tuple(p) for p in pos)
        assert set(index.label[rows]) == {store.meta(sid).label_index}
    assert index.key(0) == ("s0", (0, 0, 0))
    assert index.class_counts() == ((index.label == 0).sum(), (index.label == 1).sum())


def test_foreground_filter_matches_voxels_and_reads_none(tmp_path, monkeypatch):
    arr = tissue((2, 16, 64, 96), seed=4)
    arr[:, :, :, :40] = 0  # a wide empty band: patches over it have little foreground
    write_array(tmp_path / "fg.zarr", "a", arr)
    store = Store(tmp_path / "fg.zarr")
    # patches aligned with the (8, 32, 32) stats cells: the stored fractions are exact
    full = build_index(store, ["a"], PatchConfig(size=(8, 32, 32)))
    fg = (arr > 0).any(axis=0)
    exact = np.array([fg[z:z + 8, y:y + 32, x:x + 32].mean() for z, y, x in full.position])
    monkeypatch.setattr(Store, "chunk_region", lambda *a, **k: pytest.fail("the filter read voxels"))
    kept = build_index(store, ["a"], PatchConfig(size=(8, 32, 32), foreground_min=0.5))
    assert 0 < len(kept) < len(full)
    assert sorted(map(tuple, kept.position)) == sorted(map(tuple, full.position[exact >= 0.5]))


def test_foreground_fraction_weights_partial_cells(tmp_path):
    arr = np.zeros((1, 8, 32, 64), np.uint8)
    arr[:, :, :, 32:] = 200  # right stats cell full, left empty
    write_array(tmp_path / "half.zarr", "a", arr)
    store = Store(tmp_path / "half.zarr")
    # a 16-wide patch at x=24 has 8 columns in each cell: fraction 0.5
    index = build_index(store, ["a"], PatchConfig(size=(8, 32, 16), stride=(8, 32, 8), edge="drop"))
    assert index.position[:, 2].tolist() == [0, 8, 16, 24, 32, 40, 48]
    kept = build_index(store, ["a"], PatchConfig(size=(8, 32, 16), stride=(8, 32, 8), edge="drop",
                                                 foreground_min=0.5))
    assert kept.position[:, 2].tolist() == [24, 32, 40, 48]


@pytest.mark.parametrize("edge", ["fit", "drop"])
def test_patch_larger_than_stack_names_the_stack(small_store, edge):
    path, _ = small_store
    store = Store(path)
    with pytest.raises(PipelineError, match=r"stack 's1' .* smaller than the patch .*patch.edge"):
        build_index(store, store.stack_ids, PatchConfig(size=(18, 16, 16), edge=edge))


def test_pad_accepts_a_small_stack(small_store):
    path, _ = small_store
    store = Store(path)
    index = build_index(store, ["s1"], PatchConfig(size=(18, 16, 16), edge="pad"))
    assert index.position[:, 0].tolist() == [0] * 4  # (16, 32, 32) -> one z position, 2 x 2 in y, x


def test_empty_inputs_and_filters_are_errors(small_store):
    path, _ = small_store
    store = Store(path)
    with pytest.raises(PipelineError, match="no stacks"):
        build_index(store, [], PatchConfig(size=(8, 16, 16)))
    with pytest.raises(PipelineError, match="foreground_min"):
        build_index(store, ["s0"], PatchConfig(size=(8, 16, 16), foreground_min=1.01))


def _padded_store(tmp_path, valid=(6, 40, 50), shape=(16, 64, 64)):
    """A tissue stack of `valid` voxels zero-padded to `shape` (as convert --pad writes it)."""
    arr = np.zeros((3, *shape), np.uint8)
    arr[:, :valid[0], :valid[1], :valid[2]] = tissue((3, *valid), seed=2, empty_corner=False)
    write_array(tmp_path / "pad.zarr", "a", arr, valid_zyx=valid)
    return Store(tmp_path / "pad.zarr")


@pytest.mark.parametrize("edge, size, want", [
    ("fit", (8, 32, 32), [(0, 0, 0), (0, 0, 32), (0, 32, 0), (0, 32, 32)]),  # of 8: z = 8 is all padding
    ("drop", (8, 32, 32), [(0, 0, 0), (0, 0, 32), (0, 32, 0), (0, 32, 32)]),
    ("pad", (12, 48, 48), [(0, 0, 0), (0, 0, 48)]),  # (0, 0, 48) runs past the stored edge too
    ("pad", (24, 96, 96), [(0, 0, 0)]),  # larger than the stack: its one patch stays
], ids=["fit", "drop", "pad-edge", "pad-larger-than-stack"])
def test_patches_wholly_in_padding_are_dropped(tmp_path, edge, size, want):
    store = _padded_store(tmp_path)
    index = build_index(store, ["a"], PatchConfig(size=size, edge=edge))
    assert [tuple(p) for p in index.position.tolist()] == want
    frac = index.padded_fraction(index.stack, index.position)
    inside = np.prod(np.minimum(index.position + np.array(size), (6, 40, 50)) - index.position, axis=1)
    np.testing.assert_allclose(frac, 1 - inside / np.prod(size))
    assert 0 <= frac.min() and frac.max() < 1


def test_foreground_filter_counts_padding_as_background(tmp_path):
    """Cells partly in padding hold their valid voxels' fraction; a patch's fraction is over all its voxels."""
    store = _padded_store(tmp_path, valid=(8, 48, 64), shape=(8, 64, 64))
    size = (8, 32, 32)
    full = build_index(store, ["a"], PatchConfig(size=size))
    fg = np.zeros((8, 64, 64))
    fg[:, :48] = (store.read("a")[:, :, :48] > 0).any(axis=0)
    exact = np.array([fg[z:z + 8, y:y + 32, x:x + 32].mean() for z, y, x in full.position])
    assert exact.tolist() == pytest.approx([1.0, 1.0, 0.5, 0.5])  # the lower row is half padding
    kept = build_index(store, ["a"], PatchConfig(size=size, foreground_min=0.75))
    assert kept.position.tolist() == full.position[:2].tolist()


def test_an_index_without_valid_regions_reports_no_padding(small_store):
    path, _ = small_store
    index = build_index(Store(path), ["s0"], PatchConfig(size=(8, 16, 16)))
    assert not index.padded_fraction(index.stack, index.position).any()
    bare = dataclasses.replace(index, valid=None)
    assert bare.padded_fraction(index.stack[:3], index.position[:3]).tolist() == [0.0] * 3
