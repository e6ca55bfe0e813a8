"""`stacktrain bench train`: real training steps with the real loader against the same steps on
synthetic batches already on the device.

Three measurements, each the median of N segments of K steps:
- model alone: normalisation + forward + backward + Adam step on one synthetic raw batch that never
  leaves the device (the same `TrainStep` as training, so the device-side normalisation is included);
- loader alone: batches from the loader, nothing done with them;
- real: the loader feeding the same steps. Data-wait % is the share of the segment spent blocked
  waiting for the next batch (the device is synchronized after every step, so waiting is idle time).
Headroom = loader-alone patches/s / model-alone patches/s: above 1 the loader can keep the model busy.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from stacktrain.pipelines.config import LoaderConfig, PatchConfig, PreprocessConfig
from stacktrain.pipelines.loaders import build_loader, resolve_loader
from stacktrain.stores.reader import Store
from stacktrain.train.precision import Precision
from stacktrain.train.step import TrainStep

from . import data
from .measure import Tick, available_cores, cuda_sync, measure, no_tick
from .model_bench import model_api


def defaults(cuda: bool) -> dict[str, Any]:
    """The seed's setting on a GPU; on a 2-core CPU a tiny model on smaller patches (about a minute)."""
    if cuda:
        return {"model": "resnet3d50", "tiny": False, "patch": (32, 256, 256), "stride": (8, 64, 64),
                "batch": 64, "precision": "bf16", "loader": "auto", "steps": 4}
    return {"model": "resnet3d18", "tiny": True, "patch": (16, 64, 64), "stride": None, "batch": 4,
            "precision": "fp32", "loader": "auto", "steps": 2}


def _memory(device: torch.device) -> dict[str, float]:
    """torch's peak and the device memory in use (cudaMemGetInfo: DALI's pools and NCCL included), GiB."""
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"torch_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "device_used_gib": (total - free) / 2**30}


def _stream(loader):
    """Every batch of epochs 0, 1, 2, ... in order (one generator, so no epoch is abandoned midway)."""
    for epoch in itertools.count():
        yield from loader.epoch(epoch)


def bench_train(*, store: str | Path | None = None, cache: Path | None = None, stacks: int = data.DEFAULT_STACKS,
                shape_zyx=data.DEFAULT_SHAPE_ZYX, loader: str | None = None, model: str | None = None,
                tiny: bool | None = None, patch=None, stride=None, batch: int | None = None,
                precision: str | None = None, workers: int | None = None, prefetch: int = 2,
                channels_last: bool | None = None, segments: int = 5,
                warmup: int = 1, steps_per_segment: int | None = None, seed: int = 0,
                tick: Tick = no_tick) -> dict[str, Any]:

    cuda = torch.cuda.is_available()
    d = defaults(cuda)
    model_name, tiny = model or d["model"], d["tiny"] if tiny is None else tiny
    patch, batch, precision = tuple(patch or d["patch"]), batch or d["batch"], precision or d["precision"]
    stride = tuple(stride) if stride else (d["stride"] if patch == tuple(d["patch"]) else None)
    kind = resolve_loader(loader or d["loader"])
    steps_per_segment = steps_per_segment or d["steps"]
    workers = workers or available_cores()
    dtype = precision  # the loader delivers what the model computes in
    path = Path(store) if store else data.generated_store(cache, stacks=stacks, shape_zyx=shape_zyx, seed=seed)
    st = Store(path)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    torch.manual_seed(seed)
    api = model_api()
    api.check(model_name)
    channels_last = cuda if channels_last is None else channels_last  # as the seed preset trains on a GPU
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = api.build(model_name, tiny=tiny).to(device, memory_format=fmt).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)  # the seed's
    step = TrainStep(net, optimizer, torch.nn.BCEWithLogitsLoss(), Precision.create(precision, device), device)
    sync = cuda_sync()

    cfg = LoaderConfig(loader=kind, batch_size=batch, workers=workers, prefetch=prefetch, dtype=dtype, seed=seed,
                       channels_last=channels_last)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    the_loader = build_loader(st, st.stack_ids, train=True, patch=PatchConfig(size=patch, stride=stride),
                              prep=PreprocessConfig(), cfg=cfg, device_id=0 if cuda else None)
    try:
        stream = _stream(the_loader)
        first = next(stream)
        hi = torch.iinfo(first.images.dtype).max
        synthetic = dataclasses.replace(  # raw patches already on the device: normalised by the step as usual
            first, images=torch.randint(0, hi, first.images.shape, device=device, dtype=torch.int32)
            .to(first.images.dtype), labels=torch.randint(0, 2, (len(first),), device=device).float(),
            lo=first.lo.to(device), mul=first.mul.to(device))

        def model_alone() -> int:
            for _ in range(steps_per_segment):
                step(synthetic)
                sync()
            return steps_per_segment * batch

        def loader_alone() -> int:
            return sum(len(next(stream)) for _ in range(steps_per_segment))

        waits: list[float] = []

        def real() -> int:
            waited, start, n = 0.0, time.perf_counter(), 0
            for _ in range(steps_per_segment):
                t0 = time.perf_counter()
                b = next(stream)
                waited += time.perf_counter() - t0
                step(b)
                sync()
                n += len(b)
            waits.append(waited / (time.perf_counter() - start))
            return n

        results = {name: measure(fn, label=f"train {name}", segments=segments, warmup=warmup, sync=sync, tick=tick)
                   for name, fn in (("model_alone", model_alone), ("loader_alone", loader_alone), ("real", real))}
    finally:
        the_loader.close()
    timed_waits = waits[warmup:]
    model_rate, loader_rate = results["model_alone"]["per_s"], results["loader_alone"]["per_s"]
    return {"bench": "train",
            "config": {"store": str(path), "generated": store is None, "loader": kind, "model": model_name,
                       "tiny": tiny,
                       "patch": list(patch), "stride": list(stride) if stride else None, "batch": batch,
                       "precision": precision, "loader_dtype": dtype, "channels_last": channels_last,
                       "workers": workers, "prefetch": prefetch,
                       "segments": segments, "warmup": warmup, "steps_per_segment": steps_per_segment, "seed": seed,
                       "device": torch.cuda.get_device_name(0) if cuda else "cpu"},
            "results": results,
            "data_wait_pct": 100 * statistics.median(timed_waits),
            "data_wait_pct_segments": [100 * w for w in timed_waits],
            "loader_headroom": loader_rate / model_rate,
            "memory": _memory(device),
            "real_vs_model_alone": results["real"]["per_s"] / model_rate}
