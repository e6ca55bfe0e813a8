"""`stacktrain bench store`: read throughput of random patches over chunk/shard layouts and codecs.

One generated tissue-like stack is written once per layout (cached) with zarr-python, the way the
store writer does (one chunk = one channel of a z, y, x block; one shard = all channels of a block),
and read back through the pipelines' CPU path: shard-index lookup and coalesced reads
(`stores.chunks.gather`), decode (`stores.chunks.decode`), reassembly and crop. Random patch-aligned
and unaligned boxes; one process (one core), so layouts compare on equal terms. The compression
ratio is raw bytes / bytes in the shard files. Evidence for the store's default layout.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from stacktrain.io import atomic_write
from stacktrain.stores import chunks

from . import data
from .measure import Tick, measure_interleaved, no_tick

CODECS = ("lz4", "zstd", "blosc-lz4")
LAYOUTS = (  # (chunk zyx, shard zyx); the first is the store's default
    ((16, 64, 64), (32, 256, 256)),
    ((8, 32, 32), (32, 256, 256)),
    ((32, 128, 128), (32, 256, 256)),
    ((32, 256, 256), (32, 256, 256)),
    ((16, 64, 64), (64, 512, 512)),
)


def _compressor(codec: str):
    import zarr.codecs
    if codec == "lz4":
        from zarr.codecs.numcodecs import LZ4
        return LZ4()
    if codec == "zstd":
        return zarr.codecs.ZstdCodec(level=3)
    if codec == "blosc-lz4":  # byte shuffle is a no-op on uint8: this is LZ4 inside Blosc's container
        return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=1)
    raise ValueError(f"unknown codec {codec!r}; one of {CODECS}")


def cached_volume(cache: Path, shape_zyx, seed: int) -> np.ndarray:
    path = cache / f"vol-{data.generator_name()}{data.GENERATOR_VERSION}-{'x'.join(map(str, shape_zyx))}-{seed}.npy"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        volume = data.tissue_volume(0, shape_zyx, seed)
        atomic_write(path, lambda f: np.save(f, volume))
    return np.load(path, mmap_mode="r")


def layout_array(cache: Path, vol: np.ndarray, vol_key: str, codec: str, chunk, shard) -> tuple[Path, float | None]:
    """The volume written with one layout (cached); returns its array folder and the write time when
    it was written by this call (None when it came from the cache)."""
    import zarr
    name = f"layout-{vol_key}-{codec}-{'x'.join(map(str, chunk))}-{'x'.join(map(str, shard))}.zarr"
    path = cache / name
    if (path / "zarr.json").exists():
        return path, None
    tmp = cache / f".{name}.{uuid.uuid4().hex[:8]}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numcodecs' LZ4 is not a v3 core codec: chosen on purpose
            start = time.perf_counter()
            arr = zarr.create_array(tmp, shape=vol.shape, dtype=vol.dtype, chunks=(1, *chunk),
                                    shards=(vol.shape[0], *shard), compressors=[_compressor(codec)], fill_value=0)
            arr[...] = np.asarray(vol)
            elapsed = time.perf_counter() - start
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / "zarr.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path, elapsed


def random_boxes(shape_zyx, patch, n: int, *, aligned: bool, seed: int) -> list[tuple]:
    rng = np.random.default_rng((seed, int(aligned)))
    boxes = []
    for _ in range(n):
        if aligned:
            start = [int(rng.integers(0, s // p)) * p for s, p in zip(shape_zyx, patch)]
        else:
            start = [int(rng.integers(0, s - p + 1)) for s, p in zip(shape_zyx, patch)]
        boxes.append(tuple((a, a + p) for a, p in zip(start, patch)))
    return boxes


def read_patch(files, box, codec: str) -> np.ndarray:
    """The CPU read path of the loaders, on one ShardFiles: bytes, decode, reassemble, crop."""
    region = chunks.gather(files, box, codec=codec, dtype="uint8", raw_lz4=False)
    vox = chunks.reassemble(chunks.decode(region), region.grid)
    sl = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, region.origin_zyx))
    return np.ascontiguousarray(vox[(slice(None), *sl)])


def bench_store(*, cache: Path | None = None, shape_zyx=data.DEFAULT_SHAPE_ZYX, patch=(32, 256, 256),
                layouts=LAYOUTS, codecs=CODECS, patches: int = 8, segments: int = 5, warmup: int = 1,
                seed: int = 0, tick: Tick = no_tick) -> dict[str, Any]:
    import numcodecs.blosc


    numcodecs.blosc.use_threads = False  # one core for every codec
    cache = Path(cache or data.default_cache())
    vol = cached_volume(cache, shape_zyx, seed)
    vol_key = f"{data.generator_name()}{data.GENERATOR_VERSION}-{'x'.join(map(str, shape_zyx))}-{seed}"
    raw_bytes = vol.nbytes
    boxes = {kind: random_boxes(shape_zyx, patch, patches, aligned=kind == "aligned", seed=seed)
             for kind in ("aligned", "unaligned")}
    patch_bytes = vol.shape[0] * int(np.prod(patch))
    rows = []
    for codec, (chunk, shard) in itertools.product(codecs, layouts):
        if any(s % c for s, c in zip(shard, chunk)):
            raise ValueError(f"shard {shard} is not a multiple of chunk {chunk}")
        path, write_s = layout_array(cache, vol, vol_key, codec, chunk, shard)
        meta_path = path / "stacktrain-bench.json"  # remembers the first write time
        if write_s is not None:
            meta_path.write_text(json.dumps({"write_s": write_s}))
        elif meta_path.exists():
            write_s = json.loads(meta_path.read_text())["write_s"]
        stored = sum(f.stat().st_size for f in (path / "c").rglob("*") if f.is_file())
        files = chunks.ShardFiles(path, vol.shape, (1, *chunk), (vol.shape[0], *shard), 1)
        label = f"{codec} chunk {'x'.join(map(str, chunk))} shard {'x'.join(map(str, shard))}"
        check = read_patch(files, boxes["unaligned"][0], codec)  # the read path returns the right voxels
        (z0, z1), (y0, y1), (x0, x1) = boxes["unaligned"][0]
        if not np.array_equal(check, vol[:, z0:z1, y0:y1, x0:x1]):
            raise RuntimeError(f"{label}: read back differs from the written volume")

        def reader(kind):
            def run() -> int:
                for box in boxes[kind]:
                    read_patch(files, box, codec)
                return len(boxes[kind])
            return run
        rates = measure_interleaved({f"{label} {k}": reader(k) for k in boxes}, segments=segments, warmup=warmup,
                                    tick=tick)
        files.close()
        row = {"codec": codec, "chunk_zyx": list(chunk), "shard_zyx": list(shard),
               "default": (codec, chunk, shard) == ("lz4", *LAYOUTS[0]), "gpu_decodable": codec == "lz4",
               "compression_ratio": raw_bytes / stored, "stored_mb": stored / 1e6, "write_s": write_s,
               "chunks_per_aligned_patch": vol.shape[0] * int(np.prod([-(-p // c) for p, c in zip(patch, chunk)]))}
        for kind in boxes:
            r = rates[f"{label} {kind}"]
            row[kind] = {"per_s": r["per_s"], "gb_per_s": r["per_s"] * patch_bytes / 1e9,
                         "segment_rates": r["segment_rates"], "cpu_ms_per_item": r["cpu_ms_per_item"],
                         "cores_busy": r["cores_busy"]}
        rows.append(row)
    return {"bench": "store",
            "config": {"shape_czyx": list(vol.shape), "patch": list(patch), "patches_per_segment": patches,
                       "segments": segments, "warmup": warmup, "seed": seed, "generator": data.generator_name(),
                       "cores": 1},
            "results": rows}
