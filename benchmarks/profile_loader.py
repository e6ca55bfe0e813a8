"""`bench loader --profile`: where the CPU time of one dali-cpu patch goes, stage by stage.

py-spy cannot see inside DALI's C++ operators, so each stage is timed on its own: the worker side
(the pipelines' source: gather, decode, finish the patch) with CPU clocks per call and cProfile for
the Python functions, and the trainer's device-side normalisation run on the CPU. What DALI itself
costs is measured in the timed run (`bench loader`'s dali-cpu row): the main process's CPU (pipeline,
transport from the workers, torch tensors) apart from the whole process tree's, whose rest is the
workers' (the source as above, plus handing each batch to DALI's shared memory).
All figures are CPU milliseconds per patch (one core, except normalisation: torch's threads).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
import types
from typing import Any

from stacktrain.pipelines.config import PatchConfig, PreprocessConfig
from stacktrain.pipelines.contract import DTYPES
from stacktrain.pipelines.normalize import normalize_images, stack_norm_params
from stacktrain.pipelines.patches import build_index
from stacktrain.pipelines.source import PatchSource, finished_patch
from stacktrain.stores import chunks


def _cpu_ms(fn, repeat: int) -> float:
    fn()  # warm
    start = time.process_time()
    for _ in range(repeat):
        fn()
    return 1e3 * (time.process_time() - start) / repeat


def worker_side(source, epoch: int, batches: int) -> dict[str, Any]:
    """Per-patch and per-chunk CPU cost of what DALI's parallel workers run, stage by stage, plus
    cProfile's top. Patches are taken one at a time, each dropped before the next, as a worker does:
    its buffers are recycled (holding them all would time fresh pages instead)."""
    keys = []
    for i in range(batches):
        rows, slots = source.plan(epoch).batch(i)
        keys += [(int(slot), int(row)) for row, slot in zip(rows, slots)]
    names = ("gather (read chunk bytes)", "decode (LZ4 on the CPU)", "finish (reassemble+crop+flip copy)")
    for _ in range(2):  # the first pass opens the shard files and reads their indexes
        spent, n_chunks = [0.0, 0.0, 0.0], 0
        for slot, row in keys:
            t0 = time.process_time()
            start, flips = source.augmentation(epoch, slot, row)
            box = tuple((int(s), int(s) + n) for s, n in zip(start, source.index.size))
            region = source.store.chunk_region(source.index.stack_ids[int(source.index.stack[row])], box)
            t1 = time.process_time()
            decoded = chunks.decode(region)
            t2 = time.process_time()
            finished_patch(decoded, region, start, source.index.size, flips)
            t3 = time.process_time()
            for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2)):
                spent[k] += dt
            n_chunks += region.n_chunks
            del region, decoded
    stages = {name: 1e3 * dt / len(keys) for name, dt in zip(names, spent)}
    per_chunk = {name: 1e6 * dt / max(n_chunks, 1) for name, dt in zip(names, spent)}
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(batches):
        source(types.SimpleNamespace(epoch_idx=epoch - source.epoch_offset, iteration=i))
    profiler.disable()
    return {"stages_ms_per_patch": stages, "stages_us_per_chunk": per_chunk,
            "chunks_per_patch": n_chunks / len(keys), "cprofile_top": _top(profiler, len(keys))}


def _top(profiler: cProfile.Profile, patches: int, n: int = 8) -> list[dict[str, Any]]:
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        rows.append({"function": f"{file.rsplit('/', 1)[-1]}:{line}({name})", "calls": calls,
                     "tottime_ms_per_patch": 1e3 * tottime / patches, "cumtime_ms_per_patch": 1e3 * cumtime / patches})
    return sorted(rows, key=lambda r: -r["tottime_ms_per_patch"])[:n]


def normalize_side(source, epoch: int, *, dtype: str, clip: bool, repeat: int = 3) -> float:
    """CPU ms per patch of the trainer's input step (pipelines.normalize) on this machine's CPU threads."""
    import numpy as np
    import torch

    batch = source(types.SimpleNamespace(epoch_idx=epoch - source.epoch_offset, iteration=0))
    fields = dict(zip(source.fields, batch))
    raw = torch.from_numpy(np.stack(fields["patch"]))
    lo, mul = (torch.from_numpy(np.stack(fields[k])) for k in ("lo", "mul"))
    return _cpu_ms(lambda: normalize_images(raw, lo, mul, clip=clip, dtype=DTYPES[dtype]), repeat) / len(raw)


def profile_dali_cpu(store, stack_ids, *, patch, batch: int, dtype: str, seed: int) -> dict[str, Any]:
    prep = PreprocessConfig()
    index = build_index(store, stack_ids, PatchConfig(size=tuple(patch)))
    norm, clip = stack_norm_params(store, stack_ids, prep, train=True)
    source = PatchSource(store, index, norm, train=True, raw_lz4=False, batch_size=batch, seed=seed,
                         flip=prep.flip, jitter=prep.jitter)
    report = {"worker": worker_side(source, 1, batches=min(2, len(source.plan(1))))}
    report["normalize_ms_per_patch"] = {f"normalize on the CPU to {dtype} (trainer's input step)":
                                        normalize_side(source, 1, dtype=dtype, clip=clip)}
    return report
