"""The convert fast path: shard files byte for byte as zarr-python writes them, statistics equal to
the float64 definitions, sha256 while reading, the reader thread."""

from __future__ import annotations

import hashlib
import threading
import warnings

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec
from zarr.codecs.numcodecs import LZ4

from stacktrain.errors import InputError
from stacktrain.stores.shards import ShardWriter
from stacktrain.stores.sources import StreamingSha256, read_ahead, source_sha256
from stacktrain.stores.stats import SlabStats
from stacktrain.testing import tissue

CHUNK, SHARD = (8, 16, 16), (16, 32, 32)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("c/**/*")) if p.is_file()}


EVEN = [(codec, dtype, CHUNK, SHARD) for codec in ("lz4", "zstd") for dtype in ("uint8", "uint16")]
ODD = [("lz4", "uint8", (5, 9, 11), (10, 18, 33))]  # 495-byte chunks: not whole 8-byte words


@pytest.mark.parametrize("codec,dtype,chunk,shard", EVEN + ODD,
                         ids=[f"{c}-{d}-{'x'.join(map(str, k))}" for c, d, k, _ in EVEN + ODD])
def test_shards_are_the_bytes_zarr_python_writes(tmp_path, codec, dtype, chunk, shard):
    vol = tissue((3, 40, 70, 90), seed=1).astype(dtype)  # edges in z, y and x: partial chunks and shards
    vol[:, :16, :40, :40] = 0  # empty chunks (not stored) and an empty shard (no file)
    kw = dict(shape=vol.shape, dtype=dtype, chunks=(1, *chunk), shards=(3, *shard), fill_value=0,
              compressors=[LZ4()] if codec == "lz4" else [ZstdCodec(level=3)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.create_array(tmp_path / "ref", **kw)[...] = vol
        zarr.create_array(tmp_path / "new", **kw)
    writer = ShardWriter(tmp_path / "new", vol.shape, dtype, codec=codec, chunk_zyx=chunk, shard_zyx=shard)
    for z0 in range(0, 40, 2 * shard[0]):  # slabs of two shards in z
        writer.write_slab(z0, vol[:, z0:z0 + 2 * shard[0]])
    ref, new = _files(tmp_path / "ref"), _files(tmp_path / "new")
    assert "c/0/0/0/0" not in ref and len(ref) == writer.shards_written
    assert new == ref
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "new")[...], vol)


def test_a_slab_off_the_shard_grid_is_refused(tmp_path):
    writer = ShardWriter(tmp_path, (3, 32, 32, 32), "uint8", codec="lz4", chunk_zyx=CHUNK, shard_zyx=SHARD)
    with pytest.raises(ValueError, match="shard boundary"):
        writer.write_slab(8, np.zeros((3, 16, 32, 32), np.uint8))


@pytest.mark.parametrize("dtype,shape,threshold", [("uint8", (3, 33, 65, 31), 5), ("uint8", (3, 32, 64, 64), 300),
                                                   ("uint16", (3, 32, 40, 50), 1000)])
def test_statistics_equal_their_float64_definitions(dtype, shape, threshold):
    rng = np.random.default_rng(0)
    vol = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    vol[:, :5] = 0
    stats = SlabStats(shape, dtype, threshold)
    for z0 in range(0, shape[1], 16):
        stats.add(z0, vol[:, z0:z0 + 16])
    kz, ky, kx = stats.cell
    for gz, gy, gx in np.ndindex(*stats.grid):  # every cell, the partial ones at the edges included
        cell = vol[:, gz * kz:(gz + 1) * kz, gy * ky:(gy + 1) * ky, gx * kx:(gx + 1) * kx]
        assert stats.fg[gz, gy, gx] == np.float32((cell > threshold).any(axis=0).mean())
        np.testing.assert_array_equal(stats.mean[:, gz, gy, gx], cell.reshape(3, -1).mean(axis=1).astype(np.float32))
    for ch in range(3):
        f = vol[ch].astype(np.float64)
        assert stats.sum[ch] == f.sum() and stats.sumsq[ch] == (f * f).sum()
        np.testing.assert_array_equal(stats.hist[ch], np.bincount(vol[ch].ravel(), minlength=stats.hist.shape[1]))
    lo = np.percentile(vol[0], 1, method="inverted_cdf")
    assert stats.percentiles()["p1"][0] == pytest.approx(lo, abs=1)


def test_sha256_while_reading_equals_the_file_digest(tmp_path):
    data = np.random.default_rng(1).bytes(3_000_001)
    (tmp_path / "f.bin").write_bytes(data)
    hasher = StreamingSha256(tmp_path / "f.bin")
    for fraction in (0.1, 0.1, 0.5, 0.99):
        hasher.advance(fraction)
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest() == source_sha256(tmp_path / "f.bin")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.png").write_bytes(b"x")
    assert StreamingSha256(tmp_path / "d").hexdigest() == source_sha256(tmp_path / "d")


def test_a_file_that_grows_while_hashed_is_an_error(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"a" * 1000)
    hasher = StreamingSha256(tmp_path / "f.bin")
    hasher.advance(0.5)
    with open(tmp_path / "f.bin", "ab") as f:
        f.write(b"more")
    with pytest.raises(InputError, match="grew while it was read"):
        hasher.hexdigest()


def test_read_ahead_runs_in_a_thread_keeps_order_and_raises_in_the_caller():
    seen = []

    def items():
        yield from range(5)
        raise InputError("broken at the end")

    it = read_ahead(items(), after=lambda i: seen.append((i, threading.current_thread().name)))
    got = []
    with pytest.raises(InputError, match="broken at the end"):
        for i in it:
            got.append(i)
    assert got == list(range(5)) and [i for i, _ in seen] == got
    assert {name for _, name in seen} == {"stacktrain-reader"}


def test_read_ahead_closed_early_stops_its_thread():
    closed = threading.Event()

    def items():
        try:
            yield from range(100)
        finally:
            closed.set()

    it = read_ahead(items())
    assert next(it) == 0
    it.close()
    assert closed.is_set()
    assert not any(t.name == "stacktrain-reader" and t.is_alive() for t in threading.enumerate())
