"""`stacktrain bench convert`: `stacktrain convert` against the read + compress ceiling and a plain
zarr-python writer of the same layout, on generated stacks, in one run.

Measured, per input format (multi-page RGB TIFF, .npy), in rounds that take turns so that load from
other processes falls on every row alike:
- ceiling: read each stack (tifffile.imread / np.load) and LZ4-compress every (1, 16, 64, 64) chunk
  with numcodecs into a reused buffer, no Zarr, nothing written, in N processes (N = the cores);
- peer: tifffile.imread (np.load) -> zarr.create_array(chunks=(1,16,64,64), shards=(3,32,256,256),
  compressors=[LZ4()]) -> write the whole stack, in N processes;
- `stacktrain convert` (statistics, sha256, staging and renames included) with 1 and N workers, writing
  level 0 only (`levels=0`: the peer's output), and with N workers and the default pyramid beside it
  (its cost on its own row; the goals compare like with like).
Every timed run is its own subprocess (`python -m stacktrain.bench.convert_bench SPEC`), timed from
inside around the work, process pools included, so that peak RSS can be read per run: the largest
peak RSS of the processes doing the work (getrusage). Cores used = CPU seconds / wall seconds of the
run. Rates are source MB (bytes of the input files) per second, the median over rounds. The inputs
are read from the page cache (written just before): the figures are CPU bounds, not disk bounds.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from stacktrain.stores.options import DEFAULT_MIN_PATCH_ZYX
from stacktrain.stores.pyramid import default_levels

from . import data
from .convert_runs import FORMATS, THINGS, generated_inputs
from .measure import Tick, available_cores, no_tick

DEFAULT_STACKS = 4
DEFAULT_SHAPE_ZYX = (64, 1024, 1024)
GOALS = (("convert N", "peer", 1.0), ("convert N", "ceiling", 0.4))
RSS_ALLOWANCE_MB = 256  # convert's peak RSS per worker may exceed the peer's by this much
DEPTH_RSS_SLACK = 1.1  # streaming: twice the slices, (almost) the same peak RSS per worker


def _deeper(cache: Path, fmt: str, stacks: int, shape_zyx, seed: int, min_patch, scratch: Path) -> dict[str, Any]:
    """One run of convert N on stacks twice as deep (peak RSS and rate; not in the interleaved rounds)."""
    deep_shape = (2 * shape_zyx[0], *shape_zyx[1:])
    manifest, paths, size = generated_inputs(cache, fmt, stacks=stacks, shape_zyx=deep_shape, seed=seed)
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        run = _run({"thing": "convert", "paths": [str(p) for p in paths], "manifest": str(manifest),
                    "out": str(scratch), "min_patch_zyx": min_patch, "processes": stacks, "levels": 0})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"shape_zyx": list(deep_shape), "stacks": stacks, "source_bytes": size, "processes": run["processes"],
            "source_mb_per_s": size / run["wall_s"] / 1e6, "cores_busy": run["cores_busy"],
            "peak_rss_mb": run["peak_rss_mb"]}


def _run(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "stacktrain.bench.convert_runs", json.dumps(spec)],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"bench convert: {spec['thing']} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict], source_bytes: int, warmup: int) -> dict[str, Any]:
    timed = runs[warmup:]
    rates = [source_bytes / r["wall_s"] / 1e6 for r in timed]
    return {"source_mb_per_s": statistics.median(rates), "segment_rates": rates,
            "wall_s": [r["wall_s"] for r in timed], "cores_busy": statistics.median(r["cores_busy"] for r in timed),
            "processes": timed[-1]["processes"], "peak_rss_mb": max(r["peak_rss_mb"] for r in timed),
            "segments": len(timed), "warmup": warmup}


def bench_convert(*, cache: Path | None = None, stacks: int = DEFAULT_STACKS, shape_zyx=DEFAULT_SHAPE_ZYX,
                  formats=FORMATS, workers: int | None = None, segments: int = 3, warmup: int = 1, seed: int = 0,
                  tick: Tick = no_tick) -> dict[str, Any]:
    cores = available_cores()
    workers = workers or cores
    cache = Path(cache or data.default_cache())
    out: dict[str, Any] = {}
    min_patch = [min(n, m) for n, m in zip(shape_zyx, DEFAULT_MIN_PATCH_ZYX)]  # small test sizes convert too
    for fmt in formats:
        manifest, paths, source_bytes = generated_inputs(cache, fmt, stacks=stacks, shape_zyx=shape_zyx, seed=seed)
        scratch = cache / f"convert-bench-out-{fmt}"
        specs = {"ceiling": {"processes": workers}, "peer": {"processes": workers},
                 "convert 1": {"processes": 1, "levels": 0}, "convert N": {"processes": workers, "levels": 0},
                 "convert N, pyramid": {"processes": workers, "levels": None}}
        runs: dict[str, list] = {name: [] for name in specs}
        try:
            for _ in range(warmup + segments):
                for name, extra in specs.items():
                    shutil.rmtree(scratch, ignore_errors=True)  # untimed: each run writes a fresh store
                    spec = {"thing": THINGS[name], "paths": [str(p) for p in paths], "manifest": str(manifest),
                            "out": str(scratch), "min_patch_zyx": min_patch, **extra}
                    runs[name].append(_run(spec))
                    tick(f"{fmt}: {name}", source_bytes / runs[name][-1]["wall_s"] / 1e6)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        rows = {name: _summary(r, source_bytes, warmup) for name, r in runs.items()}
        for row in rows.values():
            row["ratio_to_ceiling"] = row["source_mb_per_s"] / rows["ceiling"]["source_mb_per_s"]
            row["ratio_to_peer"] = row["source_mb_per_s"] / rows["peer"]["source_mb_per_s"]
        applies = tuple(shape_zyx) == DEFAULT_SHAPE_ZYX and stacks == DEFAULT_STACKS  # the goals' size
        out[fmt] = {"source_bytes": source_bytes, "results": rows,
                    "goals": [g | {"applies": applies} for g in goals(rows)]}
        if fmt == formats[0]:  # RSS against depth: once, on `workers` stacks twice as deep
            deep = _deeper(cache, fmt, workers, shape_zyx, seed, min_patch, scratch)
            tick(f"{fmt}: convert N, 2x deeper", deep["source_mb_per_s"])
            ratio = deep["peak_rss_mb"] / rows["convert N"]["peak_rss_mb"]
            out[fmt]["deeper"] = deep
            out[fmt]["goals"].append({"goal": f"convert N peak RSS at 2x depth <= {DEPTH_RSS_SLACK:.2f}x",
                                      "value": ratio, "target": DEPTH_RSS_SLACK, "met": ratio <= DEPTH_RSS_SLACK,
                                      "applies": applies})
    return {"bench": "convert",
            "config": {"stacks": stacks, "shape_zyx": list(shape_zyx), "dtype": "uint8", "channels": 3,
                       "formats": list(formats), "workers": workers, "cores_available": cores,
                       "segments": segments, "warmup": warmup, "seed": seed,
                       "chunk_zyx": [16, 64, 64], "shard_zyx": [32, 256, 256], "codec": "lz4",
                       "default_levels": default_levels((3, *shape_zyx))},
            "results": out}


def goals(rows: dict[str, dict]) -> list[dict[str, Any]]:
    """The issue's goals on this run: throughput ratios, and peak RSS per worker against the peer's."""
    out = [{"goal": f"{name} >= {target:.1f}x {against}", "value": rows[name][f"ratio_to_{against}"],
            "target": target, "met": rows[name][f"ratio_to_{against}"] >= target} for name, against, target in GOALS]
    limit = rows["peer"]["peak_rss_mb"] + RSS_ALLOWANCE_MB
    rss = rows["convert N"]["peak_rss_mb"]
    out.append({"goal": f"convert N peak RSS per worker <= peer's + {RSS_ALLOWANCE_MB} MB", "value": rss,
                "target": limit, "met": rss <= limit})
    return out
