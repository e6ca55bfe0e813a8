"""Write one stack into a store, slab by slab, atomically; keep the root's stack list current."""

from __future__ import annotations

import errno
import json
import math
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.codecs.numcodecs import LZ4

from stacktrain.errors import StoreError
from stacktrain.io import atomic_write_text

from .convert_lock import root_lock
from .intensity import recorded
from .layout import (
    CODECS,
    DEFAULT_CHUNK_ZYX,
    DEFAULT_FOREGROUND_THRESHOLD,
    DEFAULT_SHARD_ZYX,
    FORMAT_VERSION,
    IMAGE,
    LEVEL0,
    STATS,
    STATS_CELL_ZYX,
    StackMeta,
    ome_collection,
    ome_multiscales,
    omero_channels,
    root_group_json,
    shard_grid,
    staging_dir,
)
from .pyramid import PyramidWriter
from .reader import read_stack_meta
from .shards import ShardWriter
from .stats import SlabStats

# We choose numcodecs' LZ4 on purpose (DALI's GPU inflate reads it); zarr's portability warning is noise.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3")


def init_store(path: str | Path) -> Path:
    """Create an empty store, or check that an existing one has our format version. Under the root lock:
    processes that start converting into one new store at the same moment create it once."""
    path = Path(path)
    root = path / "zarr.json"
    staging = staging_dir(path)
    made = not staging.is_dir()
    staging.mkdir(parents=True, exist_ok=True)
    try:
        with root_lock(path):
            if root.exists():
                info = json.loads(root.read_text()).get("attributes", {}).get("stacktrain", {})
                if info.get("format_version") != FORMAT_VERSION:
                    raise StoreError(f"{path}: existing store has format_version {info.get('format_version')!r}, "
                                     f"this stacktrain writes {FORMAT_VERSION}; use a new --out or --overwrite")
            else:
                if path.exists() and any(path.iterdir()):
                    raise StoreError(f"{path}: exists and is not a stacktrain store; choose another --out")
                path.mkdir(parents=True, exist_ok=True)
                write_json(root, root_group_json([]))  # first: what makes the folder a store
                write_ome_collection(path, [])
    except StoreError:
        if made:  # nothing left beside a folder that is not ours
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def write_json(path: Path, obj) -> None:
    """Atomically, or one StoreError naming the file and the space it needs when the disk is full."""
    write_text(path, json.dumps(obj, indent=2))


def write_text(path: Path, text: str) -> None:
    """Atomically, or one StoreError naming the file and the space it needs when the disk is full."""
    try:
        atomic_write_text(path, text)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        free = shutil.disk_usage(path.parent).free
        raise StoreError(f"{path}: no space left on the device to write it (needs {len(text.encode()):,} bytes "
                         f"free, {free:,} are); free some space and rerun: the file is unchanged") from None


def write_ome_collection(path: Path, metas: list[StackMeta]) -> None:
    """The root's OME group (layout.ome_collection), each file atomically; written after the root."""
    for rel, text in ome_collection(metas).items():
        (Path(path) / rel).parent.mkdir(exist_ok=True)
        write_text(Path(path) / rel, text)


def existing_meta(path: str | Path, stack_id: str) -> StackMeta | None:
    """The metadata of a stack in place, or None (absent); StoreError when it cannot be read."""
    if not (Path(path) / stack_id / "zarr.json").exists():
        return None
    return read_stack_meta(Path(path), stack_id)


def register(path: str | Path, metas: Iterable[StackMeta]) -> None:
    """Rewrite the root stack list (atomically) in the given order, keeping the store's intensity record
    (its source_dtypes: those of the listed stacks). The caller holds the root lock or the store
    (convert_parts.RootIndex, convert_lock.exclusive)."""
    metas = list(metas)
    entries = [{"stack_id": m.stack_id, "label": m.label, "group": m.group} for m in metas]
    record = recorded(path)
    if record is not None:
        seen = sorted({m.intensity["source_dtype"] for m in metas if m.intensity} | {m.dtype for m in metas
                                                                                  if not m.intensity})
        record["mapping"] = {**record["mapping"], "source_dtypes": seen}
    write_json(Path(path) / "zarr.json", root_group_json(entries, record))
    write_ome_collection(Path(path), metas)  # after the root: a full disk there leaves both as they were


def record_intensity(path: str | Path, record: dict) -> None:
    """Set the store's dtype and intensity mapping ({"dtype", "mapping"}) in its root attributes, atomically."""
    root = json.loads((Path(path) / "zarr.json").read_text())
    write_json(Path(path) / "zarr.json", root_group_json(root["attributes"]["stacktrain"]["stacks"], record))


def remove_stack(path: str | Path, stack_id: str) -> None:
    target = Path(path) / stack_id
    if target.exists():
        trash = staging_dir(path) / f"{stack_id}.old-{uuid.uuid4().hex[:8]}"
        target.rename(trash)  # out of sight first, then delete
        shutil.rmtree(trash)


def _regroup(slabs: Iterable[tuple[int, np.ndarray]], depth: int):
    """Re-cut `(z0, slab)` pairs of any depth into slabs of exactly `depth` slices (the last may be
    shorter), so that callers may stream slabs of any depth."""
    pending: list[np.ndarray] = []
    start = have = 0
    for z0, slab in slabs:
        if not pending:
            start = z0
        pending.append(slab)
        have += slab.shape[1]
        while have >= depth:
            joined = np.concatenate(pending, axis=1) if len(pending) > 1 else pending[0]
            yield start, joined[:, :depth]
            rest = joined[:, depth:]
            pending, start, have = ([rest] if rest.shape[1] else []), start + depth, rest.shape[1]
            del joined, rest
        del slab  # hold nothing of a slab already handed on while the next one is read
    if pending:
        yield start, np.concatenate(pending, axis=1) if len(pending) > 1 else pending[0]


def write_stack(path: str | Path, *, stack_id: str, label: str, group: str, source: str,
                source_sha256: str | Callable[[], str], shape: tuple[int, int, int, int], dtype: str,
                slabs: Iterable[tuple[int, np.ndarray]], spacing_zyx=None, codec: str = "lz4",
                chunk_zyx=DEFAULT_CHUNK_ZYX, shard_zyx=DEFAULT_SHARD_ZYX,
                foreground_threshold: int = DEFAULT_FOREGROUND_THRESHOLD, gaps=None, valid_zyx=None,
                source_bytes: int | None = None, intensity=None, levels: int | None = None) -> StackMeta:
    """Write a stack from `(z0, slab)` pairs (slab: (C, dz, Y, X), in z order) under a staging name
    and rename it into place. Nothing is visible under `<store>/<stack_id>` until it is complete.
    The root list is not touched: call `register` once the stack is in place.
    `source_sha256` may be a function, called once the last slab is written (`convert` hashes the
    source while reading it). Zarr-python writes the metadata; the shard files are assembled by
    `stores.shards.ShardWriter` (the same bytes, without zarr's per-chunk cost) and the statistics
    come from `stores.stats.SlabStats`, both in one pass over each slab. `valid_zyx`: the region that came
    from the source when the slabs are zero-padded past it (`convert --pad`); statistics cover only it.
    `intensity`: what was applied to the source's values (StackMeta.intensity).
    `levels`: pyramid levels beside level 0 (stores/pyramid.py), fed from the same slabs; None: the default
    (halve until the smaller of y, x is under 256), 0: none.
    """
    if codec not in CODECS:
        raise StoreError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
    if any(s % c for s, c in zip(shard_zyx, chunk_zyx)):
        raise StoreError(f"shard {shard_zyx} must be a multiple of chunk {chunk_zyx}")
    if valid_zyx is not None:
        valid_zyx = tuple(int(n) for n in valid_zyx)
        if len(valid_zyx) != 3 or not all(1 <= v <= n for v, n in zip(valid_zyx, shape[1:])):
            raise StoreError(f"{source}: valid region (z, y, x) {valid_zyx} must lie inside the shape {shape}")
    path = Path(path)
    staging = staging_dir(path) / f"{stack_id}.{uuid.uuid4().hex[:8]}"
    c = shape[0]
    try:
        stack_group = zarr.open_group(staging, mode="w", zarr_format=3)
        image = stack_group.create_group(IMAGE)
        compressors = [LZ4()] if codec == "lz4" else [ZstdCodec(level=3)]
        image.create_array(LEVEL0, shape=shape, dtype=dtype, chunks=(1, *chunk_zyx), shards=(c, *shard_zyx),
                           compressors=compressors, fill_value=0, dimension_names=("c", "z", "y", "x"))
        shards = ShardWriter(staging / IMAGE / LEVEL0, shape, dtype, codec=codec, chunk_zyx=chunk_zyx,
                             shard_zyx=shard_zyx)
        pyramid = PyramidWriter(image, shape, dtype, levels, chunk_zyx=chunk_zyx, shard_zyx=shard_zyx)
        stats = SlabStats(shape, dtype, foreground_threshold, valid_zyx)
        expected_z = 0
        # whole shards for zarr, whole statistics cells for _Stats
        for z0, slab in _regroup(slabs, math.lcm(shard_zyx[0], STATS_CELL_ZYX[0])):
            if z0 != expected_z or slab.shape[0] != c or slab.shape[2:] != tuple(shape[2:]):
                raise StoreError(f"{source}: slab at z={z0} with shape {slab.shape} does not continue "
                                 f"a stack of shape {shape}")
            shards.write_slab(z0, slab)
            stats.add(z0, slab)
            pyramid.add(slab)
            expected_z = z0 + slab.shape[1]
            del slab  # done with it before asking for the next
        if expected_z != shape[1]:
            raise StoreError(f"{source}: got {expected_z} slices, expected {shape[1]}")
        if callable(source_sha256):
            source_sha256 = source_sha256()
        pyramid.finish()
        omero = omero_channels(np.iinfo(np.dtype(dtype)).max, stats.percentiles())
        image.attrs.put({"ome": ome_multiscales(stack_id, spacing_zyx, omero, pyramid.factors)})
        stats_group = stack_group.create_group(STATS)
        stats_group.create_array("foreground", data=stats.fg, chunks=stats.fg.shape)
        stats_group.create_array("mean", data=stats.mean, chunks=stats.mean.shape)
        meta = StackMeta(
            stack_id=stack_id, label=label, group=group, shape=tuple(shape), dtype=str(np.dtype(dtype)), gaps=gaps,
            codec=codec, chunk_zyx=tuple(chunk_zyx), shard_zyx=tuple(shard_zyx),
            spacing_zyx=tuple(spacing_zyx) if spacing_zyx else None, source=str(source),
            source_sha256=source_sha256, percentiles=stats.percentiles(),
            channel_sum=stats.sum.tolist(), channel_sumsq=stats.sumsq.tolist(),
            foreground_threshold=foreground_threshold, format_version=FORMAT_VERSION,
            record={"grid": list(shard_grid(shape, shard_zyx)), "shards": shards.files},
            valid_zyx=valid_zyx, source_bytes=source_bytes, intensity=intensity, levels=len(pyramid.levels))
        # Complete, and its completeness record written: the rename below is what makes it visible.
        stack_group.attrs.put({"stacktrain": meta.to_dict()})
        remove_stack(path, stack_id)
        staging.rename(path / stack_id)
        return meta
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
