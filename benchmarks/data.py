"""The benchmarks' generated data: tissue-like uint8 stacks, written once into a cache folder and reused.

The texture is `stores.synth`'s (smooth tissue mask with empty background, structure fields, noise,
spots, fibers, holes), so the chunks compress like the demo data (LZ4 ratio ~1.3). Where scipy is
missing (the GPU script needs only torch, numpy, zarr, numcodecs and DALI), a numpy-only texture of
the same kind stands in; the store's name says which one was used.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from stacktrain.io import build_once
from stacktrain.stores import layout
from stacktrain.stores.reader import Store
from stacktrain.testing import tissue, write_store

DEFAULT_STACKS = 4
DEFAULT_SHAPE_ZYX = (64, 512, 512)  # 8 patch-aligned 32x256x256 patches per stack
GENERATOR_VERSION = 2  # bump when the texture changes: cached stores are keyed by it


def default_cache() -> Path:
    return Path(os.environ.get("STACKTRAIN_BENCH_CACHE", Path(tempfile.gettempdir()) / "stacktrain-bench"))


def _synth_available() -> bool:
    try:
        import scipy.ndimage  # noqa: F401  (stores.synth needs it)
    except ImportError:
        return False
    return True


def generator_name() -> str:
    return "synth" if _synth_available() else "numpy"


def tissue_volume(index: int, shape_zyx, seed: int = 0) -> np.ndarray:
    """One (3, Z, Y, X) uint8 tissue-like stack, deterministic in (index, shape, seed)."""
    if _synth_available():
        from stacktrain.stores.synth import SynthStack
        # synth makes stack 1 uint16 (its one OME-TIFF case); the benchmarks want uint8 throughout.
        stack = SynthStack(index=index if index == 0 else index + 1, seed=seed, shape_zyx=tuple(shape_zyx),
                           label="MALADE" if index % 2 else "SAIN", group=f"bench{index}")
        return stack.volume()
    return tissue((3, *shape_zyx), seed=seed + 1000 * index)


def generated_store(cache: Path | None = None, *, stacks: int = DEFAULT_STACKS, shape_zyx=DEFAULT_SHAPE_ZYX,
                    seed: int = 0, codec: str = "lz4", chunk_zyx=None, shard_zyx=None) -> Path:
    """A store of `stacks` generated stacks (alternating SAIN / MALADE), written on first use only.

    Written under a unique staging name and renamed into place, so concurrent runs (pytest -n 2)
    never see a partial store; the loser of a race keeps the winner's copy.
    """

    cache = Path(cache or default_cache())
    chunk_zyx = tuple(chunk_zyx or layout.DEFAULT_CHUNK_ZYX)
    shard_zyx = tuple(shard_zyx or layout.DEFAULT_SHARD_ZYX)
    key = "-".join(map(str, (stacks, *shape_zyx, seed, codec, *chunk_zyx, *shard_zyx)))
    name = f"gen-{generator_name()}{GENERATOR_VERSION}-{hashlib.sha1(key.encode()).hexdigest()[:10]}.zarr"
    path = cache / name
    with build_once(path, "zarr.json") as staging:
        if staging is not None:
            write_store(staging, {f"gen{i:02d}": (tissue_volume(i, shape_zyx, seed), "MALADE" if i % 2 else "SAIN",
                                                  f"g{i:02d}") for i in range(stacks)},
                        codec=codec, chunk_zyx=chunk_zyx, shard_zyx=shard_zyx)
    return path


def store_description(path: Path) -> dict:
    """Stacks, shape, codec and on-disk size of a store, for the results."""
    store = Store(path)
    metas = store.stacks
    raw = sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in metas)
    stored = sum(f.stat().st_size for m in metas for f in store.array_path(m.stack_id).rglob("c/**/*") if f.is_file())
    return {"path": str(path), "stacks": len(metas), "shapes_czyx": sorted({tuple(m.shape) for m in metas}),
            "dtype": metas[0].dtype if metas else None, "codec": sorted({m.codec for m in metas}),
            "chunk_zyx": sorted({tuple(m.chunk_zyx) for m in metas}),
            "shard_zyx": sorted({tuple(m.shard_zyx) for m in metas}),
            "raw_bytes": raw, "stored_bytes": stored, "compression_ratio": raw / stored if stored else None}
