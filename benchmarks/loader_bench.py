"""`stacktrain bench loader`: patches/s of each loader against ceilings measured in the same run.

Every measured thing reads the same patches: the train plan of epochs 0, 1, ... (seed, flips as in the
default preprocessing, no jitter), CEILING_REPEAT consecutive epochs per timed segment (a small
generated store's epoch is a few batches: one epoch per segment would mostly time the loaders'
start-of-epoch latency, which a real epoch of thousands of batches hides). Rates are the median
over segments; GB/s counts the uint8 (store dtype) bytes of the patches delivered. Every loader, and
the naive baseline, delivers raw patches in the store dtype; the device-side normalisation (the trainer's
input step: pipelines.normalize, to --dtype) is measured on its own, on real batches, as
"normalize-<device>". Ratios: each loader to its ceiling ("dali" and the bytes-only source to (b),
everything that decodes on the CPU to (c)), and to the naive zarr-python baseline.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stacktrain.choices import LoaderKind, options
from stacktrain.pipelines.config import LoaderConfig, PatchConfig, PreprocessConfig
from stacktrain.pipelines.contract import DTYPES
from stacktrain.pipelines.loaders import build_loader, dali_available
from stacktrain.pipelines.normalize import normalize_images, stack_norm_params
from stacktrain.pipelines.patches import build_index
from stacktrain.pipelines.source import PatchSource
from stacktrain.stores.reader import Store

from . import ceilings, data
from .measure import Tick, available_cores, cuda_sync, measure, measure_interleaved, no_tick
from .naive import ZarrPatchDataset, naive_loader

LOADERS = tuple(k for k in options(LoaderKind) if k != "auto")
CEILING_OF = {"dali": "bytes", "source-bytes": "bytes", "dali-cpu": "decode", "torch": "decode",
              "naive-zarr": "decode"}
CEILING_NAMES = {"ram": "(a) numpy crop from RAM", "bytes": "(b) compressed chunk bytes only",
                 "decode": "(c) chunk bytes + CPU decode"}
BARS = (("dali-cpu", "ceiling", 0.7), ("dali-cpu", "naive", 3.0), ("source-bytes", "ceiling", 0.7))
NORMALIZE_REPEAT = 4  # batches normalised per timed call
CEILING_REPEAT = 4  # epochs per timed segment, for everything measured: the same patches for all


def default_loaders() -> tuple[list[str], dict[str, str]]:
    """The loaders this machine can run, and why the others are left out."""
    skipped = {}
    if not dali_available():
        skipped["dali"] = skipped["dali-cpu"] = "NVIDIA DALI does not import"
    elif not torch.cuda.is_available():
        skipped["dali"] = "no CUDA device"
    return [k for k in LOADERS if k not in skipped], skipped


def _epoch_patches(source, epoch: int) -> list[tuple[int, tuple[int, int, int], tuple[int, ...]]]:
    """(stack, crop origin, flips) of every patch of `epoch`, in delivery order."""
    rows, slots = source.plan(epoch).rows, source.plan(epoch).slots
    out = []
    for row, slot in zip(rows.tolist(), slots.tolist()):
        start, flips = source.augmentation(epoch, slot, row)
        out.append((int(source.index.stack[row]), tuple(int(v) for v in start), tuple(int(f) for f in flips)))
    return out


def bench_loader(*, store: str | Path | None = None, cache: Path | None = None, stacks: int = data.DEFAULT_STACKS,
                 shape_zyx=data.DEFAULT_SHAPE_ZYX, loaders: list[str] | None = None, patch=(32, 256, 256),
                 batch: int = 8, workers: int | None = None, prefetch: int = 2, dtype: str | None = None,
                 segments: int = 5, warmup: int = 1, seed: int = 0, profile: bool = False, naive: bool = True,
                 tick: Tick = no_tick) -> dict[str, Any]:

    generated = store is None
    path = data.generated_store(cache, stacks=stacks, shape_zyx=shape_zyx, seed=seed) if generated else Path(store)
    st = Store(path)
    ids = st.stack_ids
    cuda = torch.cuda.is_available()
    workers = workers or available_cores()
    dtype = dtype or ("bf16" if cuda else "fp32")
    default, skipped = default_loaders()
    loaders = list(default if loaders is None else loaders)
    patch_cfg, prep = PatchConfig(size=tuple(patch)), PreprocessConfig()
    index = build_index(st, ids, patch_cfg)
    norm, _ = stack_norm_params(st, ids, prep, train=True)
    source = PatchSource(st, index, norm, train=True, raw_lz4=False, batch_size=batch, seed=seed,
                         flip=prep.flip, jitter=prep.jitter)
    n_epochs = (warmup + segments) * CEILING_REPEAT
    epochs = [_epoch_patches(source, e) for e in range(n_epochs)]
    patch_nbytes = st.meta(ids[0]).shape[0] * int(np.prod(patch)) * np.dtype(st.meta(ids[0]).dtype).itemsize

    # Byte ranges of every distinct patch, looked up once (untimed); patch numbers per epoch.
    keys = sorted({(s, start) for epoch in epochs for s, start, _ in epoch})
    number = {k: i for i, k in enumerate(keys)}
    reads = [ceilings.patch_bytes(st, ids, s, tuple((a, a + n) for a, n in zip(start, patch))) for s, start in keys]
    epoch_numbers = [[number[(s, start)] for s, start, _ in epoch] for epoch in epochs]
    compressed_per_epoch = [sum(reads[i].nbytes for i in nums) for nums in epoch_numbers]

    def counter():
        """The next segment's CEILING_REPEAT consecutive epochs."""
        state = iter(range(n_epochs))
        return lambda: [next(state) for _ in range(CEILING_REPEAT)]

    gpu_source = PatchSource(st, index, norm, train=True, raw_lz4=True, batch_size=batch, seed=seed,
                             flip=prep.flip, jitter=prep.jitter)
    common = dict(cores=workers, store_path=path, stack_ids=ids)
    pools = {kind: ceilings.CeilingPool(kind, patches=reads, **common) for kind in ("ram", "bytes", "decode")}
    pools["source-bytes"] = ceilings.CeilingPool("source-bytes", source=gpu_source, **common)
    try:
        def segment_fn(kind):
            epoch = counter()
            if kind == "source-bytes":
                return lambda: pools[kind].run([(e, i) for e in epoch() for i in range(len(gpu_source.plan(e)))])
            return lambda: pools[kind].run(ceilings.patch_tasks([n for e in epoch() for n in epoch_numbers[e]],
                                                                workers))
        labels = {"ram": "ceiling (a) ram", "bytes": "ceiling (b) bytes", "decode": "ceiling (c) decode",
                  "source-bytes": "gpu source (bytes only)"}
        measured = measure_interleaved({labels[k]: segment_fn(k) for k in pools}, segments=segments,
                                       warmup=warmup, tick=tick)
        results: dict[str, dict[str, Any]] = {k: measured[labels[k]] for k in pools}
    finally:
        for pool in pools.values():
            pool.close()
    median_epoch_bytes = float(np.median(compressed_per_epoch[warmup:]))
    results["bytes"]["compressed_gb_per_s"] = results["bytes"]["per_s"] * median_epoch_bytes / len(epochs[-1]) / 1e9

    if naive:
        results["naive-zarr"] = _bench_naive(st, ids, epochs, patch, batch=batch, workers=workers,
                                             prefetch=prefetch, segments=segments, warmup=warmup, tick=tick)
    sync = cuda_sync
    sample_batch = None
    for kind in loaders:
        cfg = LoaderConfig(loader=kind, batch_size=batch, workers=workers, prefetch=prefetch, dtype=dtype, seed=seed)
        device_id = 0 if kind == "dali" or (kind == "torch" and cuda) else None
        loader = build_loader(st, ids, train=True, patch=patch_cfg, prep=prep, cfg=cfg, device_id=device_id)
        try:
            epoch, kept = counter(), []

            def one_epoch() -> int:
                n = 0
                for e in epoch():
                    for b in loader.epoch(e):
                        n += len(b)
                        if not kept:  # a real batch for the normalisation row below
                            kept.append(b)
                return n
            main0 = time.process_time()  # this process alone: the pipeline, transport, torch tensors
            results[kind] = measure(one_epoch, label=f"loader {kind}", segments=segments, warmup=warmup, sync=sync(),
                                    tick=tick)
            delivered = results[kind]["items_per_segment"] * (segments + warmup)
            results[kind]["main_cpu_ms_per_item"] = 1e3 * (time.process_time() - main0) / delivered
            results[kind]["delivers"] = str(loader.spec.raw_dtype).removeprefix("torch.")
            sample_batch = sample_batch or kept[0]
        finally:
            loader.close()
    if sample_batch is not None:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        results[f"normalize-{device.type}"] = _bench_normalize(sample_batch, device, dtype, segments=segments,
                                                               warmup=warmup, tick=tick)

    for name, r in results.items():
        r["gb_per_s"] = r["per_s"] * patch_nbytes / 1e9
        if name in CEILING_OF:
            ceiling = CEILING_OF[name]
            r["ceiling"] = ceiling
            r["ratio_to_ceiling"] = r["per_s"] / results[ceiling]["per_s"]
            r["ratio_to_naive"] = r["per_s"] / results["naive-zarr"]["per_s"] if naive else None
    out = {
        "bench": "loader",
        "store": data.store_description(path) | {"generated": generated},
        "config": {"loaders": loaders, "skipped": skipped, "patch": list(patch), "batch": batch, "workers": workers,
                   "prefetch": prefetch, "dtype": dtype, "segments": segments, "warmup": warmup, "seed": seed,
                   "patches_per_segment": len(epochs[-1]) * CEILING_REPEAT, "epochs_per_segment": CEILING_REPEAT,
                   "patch_bytes": patch_nbytes,
                   "cores_available": available_cores()},
        "results": results,
        "sanity": sanity(results),
        "bars": bars(results, default_size=generated and tuple(patch) == (32, 256, 256) and not cuda),
    }
    if profile and "dali-cpu" not in skipped:
        from .profile_loader import profile_dali_cpu
        out["profile"] = profile_dali_cpu(st, ids, patch=tuple(patch), batch=batch, dtype=dtype, seed=seed)
    return out


def _bench_normalize(batch, device: torch.device, dtype: str, *, segments, warmup, tick) -> dict[str, Any]:
    """The trainer's input step alone: a real batch (already on `device`) -> normalised `dtype` images."""
    raw, lo, mul = (t.to(device) for t in (batch.images, batch.lo, batch.mul))

    def segment() -> int:
        for _ in range(NORMALIZE_REPEAT):
            normalize_images(raw, lo, mul, clip=batch.norm.clip, dtype=DTYPES[dtype])
        return NORMALIZE_REPEAT * len(raw)
    r = measure(segment, label=f"normalize on {device.type}", segments=segments, warmup=warmup, sync=cuda_sync(),
                tick=tick)
    return r | {"dtype": dtype, "torch_threads": torch.get_num_threads(), "fused": device.type == "cuda"}


def _bench_naive(st, ids, epochs, patch, *, batch, workers, prefetch, segments, warmup, tick):
    items = [item for epoch in epochs for item in epoch]
    bounds = np.cumsum([0] + [len(e) for e in epochs])
    dataset = ZarrPatchDataset([str(st.array_path(s)) for s in ids], items, patch)
    cuda = torch.cuda.is_available()
    loader = naive_loader(dataset, batch_size=batch, workers=workers, prefetch=prefetch, pin_memory=cuda)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    state = iter(range(0, len(epochs), CEILING_REPEAT))

    def segment() -> int:
        e = next(state)
        loader.batch_sampler.range = (int(bounds[e]), int(bounds[e + CEILING_REPEAT]))
        return sum(len(b.to(device, non_blocking=True)) for b in loader)

    try:
        return measure(segment, label="naive zarr-python", segments=segments, warmup=warmup, sync=cuda_sync(),
                       tick=tick)
    finally:
        loader = None  # noqa: F841 (persistent workers stop with their iterator)


def sanity(results: dict) -> dict[str, bool]:
    """Checks any honest set of ceilings passes: (c) does (b)'s reads plus decoding, so it cannot be
    faster per patch; a copy within RAM moves bytes at least as fast as reading them from files."""
    return {"bytes_ge_decode_per_patch": results["bytes"]["per_s"] >= results["decode"]["per_s"],
            "ram_ge_bytes_per_byte_moved": results["ram"]["gb_per_s"] >= results["bytes"]["compressed_gb_per_s"]}


def bars(results: dict, *, default_size: bool) -> list[dict[str, Any]]:
    """The issue's bars, evaluated on whatever this run measured (they are set for the CPU default)."""
    out = []
    for name, against, target in BARS:
        value = results.get(name, {}).get("ratio_to_ceiling" if against == "ceiling" else "ratio_to_naive")
        if value is None:
            continue
        what = CEILING_NAMES[CEILING_OF[name]] if against == "ceiling" else "naive zarr-python baseline"
        out.append({"loader": name, "against": what, "target": target, "value": value, "met": value >= target,
                    "applies": default_size})
    return out
