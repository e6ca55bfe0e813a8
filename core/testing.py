"""Test and benchmark helpers that ship with the package (as `zarr.testing` does): tissue-like volumes
and small stores written straight from numpy arrays, without raw files or `convert`.

Used by the test suite, the benchmarks and the GPU check, so all three exercise the same bytes. Needs
only numpy and the store writer (no scipy, no torch), so it runs on a bare GPU node.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from stacktrain.stores import writer
from stacktrain.stores.reader import Store

__all__ = ["tissue", "write_array", "write_store"]


def tissue(shape_czyx, seed: int = 0, dtype=np.uint8, empty_corner: bool = True) -> np.ndarray:
    """Smooth structure + noise with an empty background corner: compresses like real tissue (LZ4 ~1.3)."""
    rng = np.random.default_rng(seed)
    c, z, y, x = shape_czyx
    zz, yy, xx = np.meshgrid(np.linspace(0, 3, z), np.linspace(0, 5, y), np.linspace(0, 5, x), indexing="ij",
                             sparse=True)
    hi = np.iinfo(dtype).max
    out = np.empty(shape_czyx, dtype)
    for ch in range(c):
        smooth = 0.5 + 0.25 * np.sin(zz + ch) * np.cos(yy * (1 + ch / 3)) + 0.2 * np.sin(xx * 1.7 + ch)
        noisy = smooth + rng.normal(0, 0.05, (z, y, x))
        out[ch] = np.clip(noisy * hi * 0.8, 0, hi).astype(dtype)
    if empty_corner:
        out[:, :, : y // 3, : x // 3] = 0
    return out


def _write(store_path, stack_id: str, arr: np.ndarray, *, label: str, group: str | None, codec: str,
           chunk_zyx, shard_zyx, slab: int | None, spacing, valid_zyx=None):
    depth = slab or shard_zyx[0]
    slabs = ((z0, arr[:, z0:z0 + depth]) for z0 in range(0, arr.shape[1], depth))
    return writer.write_stack(
        store_path, stack_id=stack_id, label=label, group=group or stack_id, source=f"memory:{stack_id}",
        source_sha256=hashlib.sha256(arr.tobytes()).hexdigest(), shape=arr.shape, dtype=arr.dtype.str[1:],
        slabs=slabs, spacing_zyx=spacing, codec=codec, chunk_zyx=tuple(chunk_zyx), shard_zyx=tuple(shard_zyx),
        valid_zyx=valid_zyx)


def write_array(store_path, stack_id: str, arr: np.ndarray, *, label: str = "SAIN", group: str | None = None,
                codec: str = "lz4", chunk_zyx=(8, 16, 16), shard_zyx=(16, 32, 32), slab: int | None = None,
                spacing=None, valid_zyx=None):
    """Write `arr` (C, Z, Y, X) as one stack of the store (created if needed) and register it beside the
    stacks already there; returns its StackMeta. `valid_zyx`: arr is zero-padded past it (as convert --pad)."""
    writer.init_store(store_path)
    meta = _write(store_path, stack_id, arr, label=label, group=group, codec=codec, chunk_zyx=chunk_zyx,
                  shard_zyx=shard_zyx, slab=slab, spacing=spacing, valid_zyx=valid_zyx)
    try:
        metas = Store(store_path).stacks
    except Exception:  # a store whose index is not written yet
        metas = []
    writer.register(store_path, [*[m for m in metas if m.stack_id != stack_id], meta])
    return meta


def write_store(path: str | Path, stacks: Mapping[str, tuple[np.ndarray, str, str]], *, codec: str = "lz4",
                chunk_zyx=(16, 64, 64), shard_zyx=(32, 256, 256)) -> Path:
    """A whole store from {stack_id: (array, label, group)}, registered once at the end."""
    path = Path(path)
    writer.init_store(path)
    metas = [_write(path, sid, arr, label=label, group=group, codec=codec, chunk_zyx=chunk_zyx,
                    shard_zyx=shard_zyx, slab=None, spacing=None)
             for sid, (arr, label, group) in stacks.items()]
    writer.register(path, metas)
    return path
