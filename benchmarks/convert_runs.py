"""What `bench convert` times: its generated inputs, and one timed run of one measured thing per
subprocess (`python -m stacktrain.bench.convert_runs SPEC_JSON` prints one JSON line), so that the
peak RSS of each run can be read from getrusage.

Inputs: `stacks` tissue-like uint8 stacks of (3, Z, Y, X) as multi-page RGB TIFF (pages Y x X x 3,
uncompressed, as microscopes write them) or .npy (c, z, y, x), plus labels.csv; written once into
the cache. The texture is `bench.data`'s; stacks wider than 512 voxels tile a 512x512 texture, which
leaves the compression of each 64 KiB chunk as it was (LZ4 sees one chunk at a time).
"""

from __future__ import annotations

import csv
import json
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from stacktrain.io import build_once
from stacktrain.stores.convert import ConvertOptions, convert

from . import data

FORMATS = ("tiff", "npy")
THINGS = {"ceiling": "ceiling", "peer": "peer", "convert 1": "convert", "convert N": "convert",
          "convert N, pyramid": "convert"}
CHUNK = (1, 16, 64, 64)
SHARD = (3, 32, 256, 256)
TEXTURE_YX = 512


def _volume(index: int, shape_zyx, seed: int) -> np.ndarray:
    z, y, x = shape_zyx
    base = data.tissue_volume(index, (z, min(y, TEXTURE_YX), min(x, TEXTURE_YX)), seed)
    reps = (1, 1, -(-y // base.shape[2]), -(-x // base.shape[3]))
    return np.ascontiguousarray(np.tile(base, reps)[:, :, :y, :x])


def generated_inputs(cache: Path, fmt: str, *, stacks: int, shape_zyx, seed: int) -> tuple[Path, list[Path], int]:
    """(manifest, source paths, source bytes on disk) of the generated inputs, written on first use."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown input format {fmt!r}; one of {FORMATS}")
    name = (f"convert-in-{fmt}-{data.generator_name()}{data.GENERATOR_VERSION}-{stacks}-"
            f"{'x'.join(map(str, shape_zyx))}-{seed}")
    folder = Path(cache) / name
    suffix = ".tif" if fmt == "tiff" else ".npy"
    with build_once(folder, "labels.csv") as staging:
        if staging is not None:
            rows = []
            for i in range(stacks):
                vol = _volume(i, shape_zyx, seed)
                if fmt == "tiff":
                    import tifffile
                    tifffile.imwrite(staging / f"s{i:02d}{suffix}", np.moveaxis(vol, 0, -1), photometric="rgb")
                else:
                    np.save(staging / f"s{i:02d}{suffix}", vol)
                rows.append((f"s{i:02d}{suffix}", f"s{i:02d}", "MALADE" if i % 2 else "SAIN", f"g{i:02d}"))
            with open(staging / "labels.csv", "w", newline="") as f:
                csv.writer(f).writerows([("path", "stack_id", "label", "group"), *rows])
    paths = sorted(folder.glob(f"s*{suffix}"))
    return folder / "labels.csv", paths, sum(p.stat().st_size for p in paths)


# -- inside the timed subprocess ----------------------------------------------------------------------

def _read(path: str) -> np.ndarray:
    """The stack as (3, Z, Y, X): a view of what tifffile / numpy read (TIFF pages are Y x X x 3)."""
    if path.endswith(".npy"):
        return np.load(path)
    import tifffile
    return np.moveaxis(tifffile.imread(path), -1, 0)


def _ceiling_one(path: str) -> int:
    """Read a stack and LZ4-compress each chunk of the store's layout from a reused buffer; no Zarr."""
    import numcodecs
    vol = _read(path)
    encode, buf = numcodecs.LZ4().encode, np.empty(CHUNK[1:], vol.dtype)
    c, z, y, x = vol.shape
    _, kz, ky, kx = CHUNK
    stored = 0
    for ch in range(c):
        for z0 in range(0, z, kz):
            for y0 in range(0, y, ky):
                for x0 in range(0, x, kx):
                    view = vol[ch, z0:z0 + kz, y0:y0 + ky, x0:x0 + kx]
                    if view.shape != buf.shape:
                        buf.fill(0)
                    buf[:view.shape[0], :view.shape[1], :view.shape[2]] = view
                    stored += len(encode(buf))
    return stored


def _peer_one(job: tuple[str, str]) -> int:
    """The plain zarr-python writer of the store's layout: read the stack, write it as one array."""
    import zarr
    from zarr.codecs.numcodecs import LZ4
    path, out = job
    vol = _read(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numcodecs' LZ4 is not a v3 core codec: chosen on purpose
        arr = zarr.create_array(out, shape=vol.shape, dtype=vol.dtype, chunks=CHUNK, shards=SHARD,
                                compressors=[LZ4()], fill_value=0)
        arr[...] = vol
    return vol.nbytes


def _pool_map(fn, jobs, processes: int) -> None:
    import concurrent.futures as cf
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")  # what convert's workers use
    with cf.ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        list(pool.map(fn, jobs))


def _cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_one(spec: dict) -> dict:
    thing, processes, paths = spec["thing"], int(spec["processes"]), spec["paths"]
    cpu0, start = _cpu_s(), time.perf_counter()
    if thing == "ceiling":
        _pool_map(_ceiling_one, paths, processes)
    elif thing == "peer":
        Path(spec["out"]).mkdir(parents=True, exist_ok=True)
        _pool_map(_peer_one, [(p, str(Path(spec["out"]) / Path(p).stem)) for p in paths], processes)
    elif thing == "convert":
        convert(spec["manifest"], spec["out"], ConvertOptions(workers=processes, levels=spec.get("levels"),
                                                              min_patch_zyx=tuple(spec["min_patch_zyx"])))
    else:
        raise ValueError(f"unknown thing {thing!r}")
    wall = time.perf_counter() - start
    cpu = _cpu_s() - cpu0
    who = resource.RUSAGE_SELF if processes == 1 and thing == "convert" else resource.RUSAGE_CHILDREN
    return {"thing": thing, "processes": processes, "wall_s": wall, "cpu_s": cpu, "cores_busy": cpu / wall,
            "peak_rss_mb": resource.getrusage(who).ru_maxrss / 1024}  # Linux reports KiB


if __name__ == "__main__":
    print(json.dumps(run_one(json.loads(sys.argv[1]))))
