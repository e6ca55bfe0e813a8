"""Shared fixtures: small stores written straight from numpy arrays."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # two pytest workers share two cores


def tissue(shape_czyx, seed=0, dtype=np.uint8, empty_corner=True):
    """Smooth structure + noise with an empty background corner: compresses like real tissue."""
    rng = np.random.default_rng(seed)
    c, z, y, x = shape_czyx
    zz, yy, xx = np.meshgrid(np.linspace(0, 3, z), np.linspace(0, 5, y), np.linspace(0, 5, x), indexing="ij")
    hi = np.iinfo(dtype).max
    out = np.empty(shape_czyx, dtype)
    for ch in range(c):
        smooth = 0.5 + 0.25 * np.sin(zz + ch) * np.cos(yy * (1 + ch / 3)) + 0.2 * np.sin(xx * 1.7 + ch)
        noisy = smooth + rng.normal(0, 0.05, smooth.shape)
        out[ch] = np.clip(noisy * hi * 0.8, 0, hi).astype(dtype)
    if empty_corner:
        out[:, :, : y // 3, : x // 3] = 0
    return out


def write_array(store_path, stack_id, arr, *, label="SAIN", group=None, codec="lz4",
                chunk_zyx=(8, 16, 16), shard_zyx=(16, 32, 32), slab=None, spacing=None):
    """Write `arr` (C, Z, Y, X) as one stack and register it; returns its StackMeta."""
    from stores import writer

    writer.init_store(store_path)
    depth = slab or shard_zyx[0]
    slabs = ((z0, arr[:, z0:z0 + depth]) for z0 in range(0, arr.shape[1], depth))
    meta = writer.write_stack(
        store_path, stack_id=stack_id, label=label, group=group or stack_id, source=f"memory:{stack_id}",
        source_sha256=hashlib.sha256(arr.tobytes()).hexdigest(), shape=arr.shape, dtype=arr.dtype.str[1:],
        slabs=slabs, spacing_zyx=spacing, codec=codec, chunk_zyx=chunk_zyx, shard_zyx=shard_zyx)
    from stores.reader import Store
    try:
        metas = Store(store_path).stacks
    except Exception:
        metas = []
    writer.register(store_path, [*[m for m in metas if m.stack_id != stack_id], meta])
    return meta


@pytest.fixture
def small_store(tmp_path):
    """Four 3-channel stacks (2 SAIN, 2 MALADE) of uneven sizes, LZ4, tiny chunks; returns (path, arrays)."""
    path = tmp_path / "small.zarr"
    arrays = {}
    shapes = [(20, 40, 48), (16, 32, 32), (24, 50, 36), (17, 33, 40)]
    for i, (z, y, x) in enumerate(shapes):
        sid = f"s{i}"
        arrays[sid] = tissue((3, z, y, x), seed=i)
        write_array(path, sid, arrays[sid], label="MALADE" if i % 2 else "SAIN", group=f"p{i // 2}")
    return path, arrays
