"""`stacktrain export STORE --out COPY [--codec zstd]`: a copy of a store in another codec, for tools
without numcodecs' LZ4 (tensorstore, zarrs in strict mode, zarr readers in other languages).

Every stack is read back slab by slab through the checked reader (a damaged stack stops the export
with its one line) and written by the same writer `convert` uses, so the copy has the same voxels,
labels, groups, sources, spacing and statistics, its own completeness record, and nothing visible
before it is complete. zstd is a core Zarr v3 codec: every Zarr reader opens the copy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from stacktrain.errors import StoreError

from . import writer
from .convert_lock import exclusive
from .intensity import recorded
from .layout import CODECS, StackMeta
from .reader import Store
from .verify import require_intact


def _slabs(store: Store, meta: StackMeta, depth: int) -> Iterator[tuple[int, np.ndarray]]:
    _, z, y, x = meta.shape
    for z0 in range(0, z, depth):
        yield z0, store.read(meta.stack_id, ((z0, min(z0 + depth, z)), (0, y), (0, x)))


def export(source: str | Path, out: str | Path, *, codec: str = "zstd", progress=None) -> list[StackMeta]:
    """Copy every stack of `source` into the new store `out` with `codec`; returns the copied metadata."""
    if codec not in CODECS:
        raise StoreError(f"--codec {codec!r}: choose one of {', '.join(CODECS)}")
    src = Store(source)
    out = Path(out)
    if out.resolve() == src.path.resolve():
        raise StoreError(f"--out {out}: is the store being exported; give a new folder")
    if out.exists() and any(out.iterdir()):
        raise StoreError(f"--out {out}: exists and is not empty; give a new folder for the copy")
    metas = src.stacks
    require_intact(src, [m.stack_id for m in metas])  # never copy damage into a clean-looking store
    target = writer.init_store(out)
    copied = []
    with exclusive(target):
        if (record := recorded(src.path)) is not None:  # the same dtype and intensity mapping
            writer.record_intensity(target, record)
        for i, m in enumerate(metas):
            depth = m.shard_zyx[0] * 2  # whole shards and whole statistics cells per slab
            copied.append(writer.write_stack(
                target, stack_id=m.stack_id, label=m.label, group=m.group, source=m.source,
                source_sha256=m.source_sha256, shape=tuple(m.shape), dtype=m.dtype, slabs=_slabs(src, m, depth),
                spacing_zyx=m.spacing_zyx, codec=codec, chunk_zyx=tuple(m.chunk_zyx), shard_zyx=tuple(m.shard_zyx),
                foreground_threshold=m.foreground_threshold, gaps=m.gaps, intensity=m.intensity,
                valid_zyx=m.valid_zyx, source_bytes=m.source_bytes, levels=m.levels))
            writer.register(target, copied)
            if progress is not None:
                progress(i + 1, len(metas), m.stack_id)
    return copied
