"""`bench loader --profile`: where the CPU time of one dali-cpu patch goes, stage by stage.

py-spy cannot see inside DALI's C++ operators, so each stage is timed on its own: the worker side
(the pipelines' source: gather, decode, finish the patch) with CPU clocks per call and cProfile for
the Python functions; the DALI graph on one CPU thread, fed one real batch, adding one operator group
at a time (the difference between two rows is that group's cost); then the copy into torch tensors.
All figures are CPU milliseconds per patch on one core.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
import types
import warnings
from typing import Any


def _cpu_ms(fn, repeat: int) -> float:
    fn()  # warm
    start = time.process_time()
    for _ in range(repeat):
        fn()
    return 1e3 * (time.process_time() - start) / repeat


def worker_side(source, epoch: int, batches: int) -> dict[str, Any]:
    """Per-patch CPU cost of what DALI's parallel workers run, split by function, plus cProfile's top."""
    from stacktrain.pipelines.source import finished_patch
    from stacktrain.stores import chunks
    keys = []
    for i in range(batches):
        rows, slots = source.plan(epoch).batch(i)
        keys += [(int(slot), int(row)) for row, slot in zip(rows, slots)]
    stages = {}
    for _ in range(2):  # the first pass opens the shard files and reads their indexes
        regions = []
        t = time.process_time()
        for slot, row in keys:
            start, flips = source.augmentation(epoch, slot, row)
            box = tuple((int(s), int(s) + n) for s, n in zip(start, source.index.size))
            regions.append((source.store.chunk_region(source.index.stack_ids[int(source.index.stack[row])], box),
                            start, flips))
    stages["gather (read chunk bytes)"] = 1e3 * (time.process_time() - t) / len(keys)
    t = time.process_time()
    decoded = [chunks.decode(region) for region, _, _ in regions]
    stages["decode (LZ4 on the CPU)"] = 1e3 * (time.process_time() - t) / len(keys)
    t = time.process_time()
    for d, (region, start, flips) in zip(decoded, regions):
        finished_patch(d, region, start, source.index.size, flips)
    stages["finish (reassemble+crop+flip copy)"] = 1e3 * (time.process_time() - t) / len(keys)
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(batches):
        source(types.SimpleNamespace(epoch_idx=epoch - source.epoch_offset, iteration=i))
    profiler.disable()
    return {"stages_ms_per_patch": stages, "cprofile_top": _top(profiler, len(keys))}


def _top(profiler: cProfile.Profile, patches: int, n: int = 8) -> list[dict[str, Any]]:
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        rows.append({"function": f"{file.rsplit('/', 1)[-1]}:{line}({name})", "calls": calls,
                     "tottime_ms_per_patch": 1e3 * tottime / patches, "cumtime_ms_per_patch": 1e3 * cumtime / patches})
    return sorted(rows, key=lambda r: -r["tottime_ms_per_patch"])[:n]


def dali_side(source, epoch: int, *, patch_cdhw, dtype: str, clip: bool, repeat: int = 3) -> dict[str, float]:
    """Cumulative CPU cost of the DALI graph on one thread, operator group by operator group."""
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali import types as dtypes
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from stacktrain.pipelines import graph

    batch = source(types.SimpleNamespace(epoch_idx=epoch - source.epoch_offset, iteration=0))
    n = len(batch[0])

    def build(stage: str):
        @pipeline_def(batch_size=n, num_threads=1, device_id=None, exec_async=False, exec_pipelined=False,
                      prefetch_queue_depth=1)
        def pipe():
            ins = dict(zip(source.fields, fn.external_source(lambda: batch, num_outputs=len(source.fields),
                                                             batch=True)))
            if stage == "as-is patch":  # what the CPU graph needs now that the worker finishes patches
                out = fn.reshape(ins["chunks"], layout="CDHW")
            else:
                out = graph.reassemble(ins["chunks"], ins["dims7"], ins["dims4"])
                if stage != "reassemble":
                    out = graph.crop(out, ins["anchor"], patch_cdhw)
                if stage not in ("reassemble", "crop"):
                    out = graph.flip(out, ins["flips"])
            if stage in ("normalize", "cast fp16", "as-is patch"):
                out = graph.normalize(out, ins["lo"], ins["mul"], clip, False)
            if stage == "cast fp16":
                out = fn.cast(out, dtype=dtypes.FLOAT16)
            return (out,) if stage != "source only" else (ins["chunks"],)
        p = pipe()
        p.build()
        return p

    stages = ["source only", "reassemble", "crop", "flip", "normalize"] + (["cast fp16"] if dtype == "fp16" else [])
    out = {}
    warnings.filterwarnings("ignore", message="The external source node")  # unused outputs: on purpose here
    for stage in stages:
        p = build(stage)
        out[f"+ {stage}" if stage != "source only" else "external_source (copy in)"] = _cpu_ms(p.run, repeat) / n
    p = build(stages[-1])
    it = DALIGenericIterator([p], ["images"], size=-1, auto_reset=True, prepare_first_batch=False)
    out["+ copy into torch tensors (DALIGenericIterator)"] = _cpu_ms(lambda: next(it), repeat) / n
    out["what-if: normalize the finished patch only (no reassemble/crop/flip ops)"] = \
        _cpu_ms(build("as-is patch").run, repeat) / n
    return out


def profile_dali_cpu(store, stack_ids, *, patch, batch: int, dtype: str, seed: int) -> dict[str, Any]:
    from stacktrain.pipelines.config import PatchConfig, PreprocessConfig
    from stacktrain.pipelines.normalize import stack_norm_params
    from stacktrain.pipelines.patches import build_index
    from stacktrain.pipelines.source import PatchSource
    prep = PreprocessConfig()
    index = build_index(store, stack_ids, PatchConfig(size=tuple(patch)))
    norm, clip = stack_norm_params(store, stack_ids, prep, train=True)
    source = PatchSource(store, index, norm, train=True, raw_lz4=False, batch_size=batch, seed=seed,
                         flip=prep.flip, jitter=prep.jitter)
    channels = store.meta(stack_ids[0]).shape[0]
    report = {"worker": worker_side(source, 1, batches=min(2, len(source.plan(1))))}
    try:
        report["dali_graph_ms_per_patch"] = dali_side(source, 1, patch_cdhw=(channels, *patch), dtype=dtype, clip=clip)
    except ImportError:
        report["dali_graph_ms_per_patch"] = None
    if dtype == "bf16":  # DALI has no bfloat16: the loader casts on the torch side
        import torch
        x = torch.zeros((channels, *patch), dtype=torch.float32)
        report["torch_bf16_cast_ms_per_patch"] = _cpu_ms(lambda: x.to(torch.bfloat16), 3)
    return report
