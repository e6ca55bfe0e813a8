"""The store's writer, reader and compressed-bytes API against zarr-python and a plain LZ4 decoder."""

from __future__ import annotations

import lz4.block
import numpy as np
import pytest
import zarr

from stacktrain.errors import StoreError
from stacktrain.stores import chunks
from stacktrain.stores.reader import Store
from stacktrain.testing import tissue, write_array


def test_read_back_equals_source_and_zarr(small_store):
    path, arrays = small_store
    store = Store(path)
    assert store.stack_ids == list(arrays)
    for sid, arr in arrays.items():
        np.testing.assert_array_equal(store.read(sid), arr)
        np.testing.assert_array_equal(zarr.open_array(store.array_path(sid), mode="r")[...], arr)
        m = store.meta(sid)
        assert m.shape == arr.shape and m.dtype == "uint8" and m.codec == "lz4"


@pytest.mark.parametrize("box", [((0, 8), (0, 16), (0, 16)), ((3, 19), (5, 37), (7, 45)),
                                 ((12, 20), (30, 40), (40, 48)), ((-4, 6), (35, 45), (0, 50))])
def test_region_bytes_decode_block_by_block(small_store, box):
    """The GPU contract: raw LZ4 blocks (no header) inflate to chunks that reassemble into the box."""
    path, arrays = small_store
    store = Store(path)
    arr = arrays["s0"]
    region = store.chunk_region("s0", box, raw_lz4=True)
    cz, cy, cx = region.chunk_zyx
    decoded = np.stack([
        np.frombuffer(lz4.block.decompress(region.data[o:o + s].tobytes(), uncompressed_size=cz * cy * cx),
                      np.uint8).reshape(cz, cy, cx)
        for o, s in zip(region.offsets, region.sizes)])
    vox = chunks.reassemble(decoded, region.grid)
    padded = np.zeros((3, 40, 80, 80), np.uint8)  # box may leave the stack: outside reads as zero
    padded[:, 8:28, 16:56, 16:64] = arr
    (z0, z1), (y0, y1), (x0, x1) = box
    oz, oy, ox = region.origin_zyx
    want = padded[:, 8 + z0:8 + z1, 16 + y0:16 + y1, 16 + x0:16 + x1]
    got = vox[:, z0 - oz:z1 - oz, y0 - oy:y1 - oy, x0 - ox:x1 - ox]
    np.testing.assert_array_equal(got, want)
    assert region.offsets.dtype == np.int32 and region.sizes.dtype == np.int32
    assert region.n_chunks == int(np.prod(region.grid))


def test_absent_chunks_read_as_zero(tmp_path):
    arr = tissue((3, 16, 32, 32), seed=3)
    arr[:, :8, :16, :16] = 0  # exactly one chunk per channel is all fill -> zarr does not store it
    write_array(tmp_path / "s.zarr", "a", arr)
    store = Store(tmp_path / "s.zarr")
    files = store._shards("a")
    assert files.chunk((0, 0, 0, 0)) is None and files.chunk((0, 1, 0, 0)) is not None
    np.testing.assert_array_equal(store.read("a"), arr)


def test_zstd_store_reads_on_cpu_but_refuses_gpu_bytes(tmp_path):
    arr = tissue((3, 16, 32, 32), seed=1)
    write_array(tmp_path / "z.zarr", "a", arr, codec="zstd")
    store = Store(tmp_path / "z.zarr")
    np.testing.assert_array_equal(store.read("a"), arr)
    with pytest.raises(StoreError, match="reconvert with `stacktrain convert --codec lz4`"):
        store.chunk_region("a", ((0, 8), (0, 16), (0, 16)), raw_lz4=True)


def test_stats_and_percentiles(tmp_path):
    arr = tissue((3, 16, 64, 64), seed=2)
    meta = write_array(tmp_path / "s.zarr", "a", arr)
    stats = Store(tmp_path / "s.zarr").stats("a")
    assert stats["foreground"].shape == (2, 2, 2)
    fg = (arr > 0).any(axis=0)
    assert stats["foreground"][0, 0, 0] == pytest.approx(fg[:8, :32, :32].mean())
    assert stats["foreground"][0, 0, 0] < stats["foreground"][1, 1, 1]
    np.testing.assert_allclose(stats["mean"][:, 1, 0, 1], arr[:, 8:16, :32, 32:64].reshape(3, -1).mean(1), rtol=1e-5)
    for ch in range(3):
        assert meta.percentiles["p99"][ch] == pytest.approx(np.percentile(arr[ch], 99), abs=1)
        assert meta.channel_sum[ch] == pytest.approx(arr[ch].astype(np.float64).sum())


def test_unknown_format_version_is_refused(small_store):
    path, _ = small_store
    import json
    root = json.loads((path / "zarr.json").read_text())
    root["attributes"]["stacktrain"]["format_version"] = 999
    (path / "zarr.json").write_text(json.dumps(root))
    with pytest.raises(StoreError, match="format_version 999"):
        Store(path)


def test_missing_store_names_path(tmp_path):
    with pytest.raises(StoreError, match="nope.zarr: store not found"):
        Store(tmp_path / "nope.zarr")


def test_slabs_of_any_depth_give_the_same_store(tmp_path):
    """write_stack re-cuts odd slab depths, so statistics cells never straddle slabs."""
    arr = tissue((3, 37, 64, 64), seed=5)
    a = write_array(tmp_path / "a.zarr", "s", arr, slab=5)
    b = write_array(tmp_path / "b.zarr", "s", arr, slab=16)
    for k in ("foreground", "mean"):
        np.testing.assert_array_equal(Store(tmp_path / "a.zarr").stats("s")[k],
                                      Store(tmp_path / "b.zarr").stats("s")[k])
    assert a.percentiles == b.percentiles
    np.testing.assert_array_equal(Store(tmp_path / "a.zarr").read("s"), arr)


def test_open_shard_files_stay_bounded(tmp_path, monkeypatch):
    """Reading many shards keeps at most MAX_OPEN_SHARDS open, and regions spanning more still read right."""
    monkeypatch.setattr(chunks, "MAX_OPEN_SHARDS", 2)
    arr = tissue((3, 32, 96, 96), seed=6)
    write_array(tmp_path / "s.zarr", "a", arr, chunk_zyx=(8, 16, 16), shard_zyx=(8, 16, 16))
    store = Store(tmp_path / "s.zarr")
    for z in range(0, 32, 8):
        box = ((z, z + 8), (0, 96), (0, 96))  # 36 shards in one region
        np.testing.assert_array_equal(store.read("a", box), arr[:, z:z + 8])
    store.read("a", ((0, 8), (0, 16), (0, 16)))
    assert len(store._shards("a")._fds) <= 36
    store._shards("a").trim()
    assert len(store._shards("a")._fds) == 2
