"""The multiscale pyramid beside level 0: block means exact against numpy, the level count, --levels 0,
memory that does not grow with the stack's depth, and training's reads left on level 0."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import zarr

from stacktrain.cli import main
from stacktrain.errors import StoreError
from stacktrain.stores import writer
from stacktrain.stores.convert import ConvertOptions, convert
from stacktrain.stores.info import summarize
from stacktrain.stores.layout import IMAGE, PYRAMID_MIN_Z
from stacktrain.stores.pyramid import PyramidWriter, default_levels, factors, level_shapes
from stacktrain.stores.reader import Store
from stacktrain.stores.verify import require_intact, verify_store
from tests.stores.test_convert import write_manifest

CHUNK, SHARD = (8, 16, 16), (16, 32, 32)


def block_mean(a: np.ndarray, f) -> np.ndarray:
    """The reference: the mean of every (fz, fy, fx) block of `a` (c, z, y, x), the edge blocks over what
    exists, rounded half up, in a's dtype."""
    c, z, y, x = a.shape
    fz, fy, fx = f
    total = np.zeros((c, -(-z // fz), -(-y // fy), -(-x // fx)), np.int64)
    count = np.zeros(total.shape[1:], np.int64)
    for i in range(fz):
        for j in range(fy):
            for k in range(fx):
                part = a[:, i::fz, j::fy, k::fx]
                total[:, :part.shape[1], :part.shape[2], :part.shape[3]] += part
                count[:part.shape[1], :part.shape[2], :part.shape[3]] += 1
    return ((total + count // 2) // count).astype(a.dtype)


def write(store, arr: np.ndarray, levels, slab: int = 16, stack_id: str = "s"):
    writer.init_store(store)
    meta = writer.write_stack(store, stack_id=stack_id, label="SAIN", group="g", source="memory", source_sha256="0",
                              shape=arr.shape, dtype=str(arr.dtype), chunk_zyx=CHUNK, shard_zyx=SHARD,
                              slabs=((z0, arr[:, z0:z0 + slab]) for z0 in range(0, arr.shape[1], slab)),
                              levels=levels)
    writer.register(store, [meta])
    return meta


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
@pytest.mark.parametrize("shape", [(2, 70, 45, 39), (2, 64, 48, 32), (1, 40, 33, 64)],
                         ids=["odd-z-halved-once", "even-z-halved-once", "z-kept"])
def test_every_level_is_the_block_mean_of_level_0(tmp_path, shape, dtype):
    rng = np.random.default_rng(sum(shape))
    arr = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    arr[:, :, :5] = np.iinfo(dtype).max  # full-range blocks: the sums must not overflow
    meta = write(tmp_path / "s.zarr", arr, levels=3, slab=24)  # 24: slabs re-cut across shard boundaries
    assert meta.levels == 3
    image = zarr.open_group(tmp_path / "s.zarr" / "s" / IMAGE, mode="r")
    fs = factors(shape, level_shapes(shape, 3))
    for k in range(4):
        got = image[str(k)][...]
        assert got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, block_mean(arr, fs[k]), err_msg=f"level {k}")
    # z halves only while it stays a patch deep; y and x always halve
    assert [f[0] for f in fs] == ([1, 1, 1, 1] if shape[1] < 2 * PYRAMID_MIN_Z else [1, 2, 2, 2])
    assert [f[1:] for f in fs] == [(1, 1), (2, 2), (4, 4), (8, 8)]


@pytest.mark.parametrize("yx, want", [((1024, 1024), 3), ((255, 4096), 0), ((256, 256), 1), ((300, 2000), 1),
                                      ((2048, 512), 2)], ids=["1024", "under-256", "256", "300x2000", "2048x512"])
def test_default_levels_halve_until_the_smaller_side_is_under_256(yx, want):
    assert default_levels((3, 64, *yx)) == want
    shapes = level_shapes((3, 64, *yx), None)
    assert len(shapes) == want
    assert all(min(s[1:]) >= 256 for s in shapes[:-1]) and (not shapes or min(shapes[-1][1:]) < 256)


def test_levels_past_one_voxel_are_refused():
    assert level_shapes((3, 8, 4, 4), 2)[-1] == (8, 1, 1)
    with pytest.raises(StoreError, match=r"--levels 3: .* halves only 2 times"):
        level_shapes((3, 8, 4, 4), 3)


@pytest.mark.parametrize("levels, want", [(None, 1), (0, 0), (2, 2)], ids=["default", "zero", "two"])
def test_convert_levels_option(tmp_path, levels, want):
    arr = np.random.default_rng(0).integers(0, 255, (3, 8, 256, 260), dtype=np.uint8)
    np.save(tmp_path / "a.npy", arr)
    manifest = write_manifest(tmp_path, [("a.npy", "a", "SAIN", "p0")])
    convert(manifest, tmp_path / "s.zarr", ConvertOptions(levels=levels, min_patch_zyx=(8, 64, 64), workers=1))
    image = zarr.open_group(tmp_path / "s.zarr" / "a" / IMAGE, mode="r")
    assert sorted(name for name, _ in image.arrays()) == [str(k) for k in range(want + 1)]
    paths = [d["path"] for d in image.attrs["ome"]["multiscales"][0]["datasets"]]
    assert paths == [str(k) for k in range(want + 1)]
    store = Store(tmp_path / "s.zarr")
    assert store.meta("a").levels == want
    np.testing.assert_array_equal(store.read("a"), arr)  # reads stay on level 0
    assert all(check.ok for check in verify_store(tmp_path / "s.zarr", deep=True))
    (row,) = summarize(tmp_path / "s.zarr")["stacks"]  # `info`: the levels, their bytes apart from level 0's
    assert row["levels"] == want and (row["pyramid_bytes"] > 0) == (want > 0)


def test_cli_refuses_negative_levels_in_one_line(tmp_path, capsys):
    code = main(["convert", str(tmp_path / "m.csv"), "--out", str(tmp_path / "s.zarr"), "--levels", "-1"])
    err = capsys.readouterr().err
    assert code == 2 and "--levels" in err and "Traceback" not in err
    assert not (tmp_path / "s.zarr").exists()


def _peak_while_writing(tmp_path, depth: int) -> int:
    """tracemalloc's peak while a (3, depth, 128, 128) stack streams through a 2-level pyramid, slab by
    slab (each made on the fly, as convert reads them)."""
    image = zarr.open_group(tmp_path / f"d{depth}", mode="w").create_group(IMAGE)
    shape = (3, depth, 128, 128)
    pyramid = PyramidWriter(image, shape, "uint8", 2, chunk_zyx=(16, 64, 64), shard_zyx=(32, 128, 128))
    rng = np.random.default_rng(depth)
    tracemalloc.start()
    try:
        for _ in range(0, depth, 32):
            pyramid.add(rng.integers(0, 255, (3, 32, 128, 128), dtype=np.uint8))
        pyramid.finish()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [level.written for level in pyramid.levels] == [depth // 2, depth // 4]
    return peak


def test_pyramid_memory_does_not_grow_with_depth(tmp_path):
    slab = 3 * 32 * 128 * 128
    shallow, deep = _peak_while_writing(tmp_path, 128), _peak_while_writing(tmp_path, 2048)
    assert deep < 1.25 * shallow + 256 * 1024, (shallow, deep)
    assert deep < 4 * slab, (deep, slab)  # a few slabs, while the stack is 64 slabs deep


def _drop_level(level_dir):
    for f in level_dir.rglob("*"):
        if f.is_file():
            f.unlink()


def _corrupt_level(level_dir):
    shard = next(p for p in (level_dir / "c").rglob("*") if p.is_file())
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the chunks or their index: zstd or the index crc32c refuses it
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, deep, says", [(_drop_level, False, "pyramid level 2 is missing"),
                                                (_corrupt_level, True, "pyramid level 2 does not read")],
                         ids=["missing-quick", "corrupt-deep"])
def test_verify_checks_the_levels_and_training_ignores_them(tmp_path, damage, deep, says):
    arr = np.random.default_rng(1).integers(0, 255, (2, 16, 64, 64), dtype=np.uint8)
    write(tmp_path / "s.zarr", arr, levels=2)
    assert all(check.ok for check in verify_store(tmp_path / "s.zarr", deep=True))
    damage(tmp_path / "s.zarr" / "s" / IMAGE / "2")
    (check,) = verify_store(tmp_path / "s.zarr", deep=deep)
    assert any(says in p for p in check.problems), check.problems
    store = Store(tmp_path / "s.zarr")
    require_intact(store, ["s"])  # training reads level 0 only: not refused
    np.testing.assert_array_equal(store.read("s"), arr)
