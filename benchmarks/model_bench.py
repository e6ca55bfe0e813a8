"""`stacktrain bench model`: forward+backward patches/s, peak memory, FLOPs and achieved TFLOP/s.

FLOPs per patch are counted by `torch.utils.flop_counter` on the meta device (`train.models.model_card`,
forward + backward at batch 1). The achieved TFLOP/s is that count times the measured patches/s; its
fraction of the matmul peak uses `--peak-tflops` when given, else a large matmul timed in this run
(bf16/fp16 8192^3 on a GPU, fp32 1024^3 on a CPU). The input is what training feeds: the autocast dtype
(bf16 for the seed preset), channels_last_3d with `channels_last`. Peak memory: the CUDA allocator's
high-water mark and the device memory in use after the run (cudaMemGetInfo, everyone's),
or on a CPU the process's peak RSS while the model ran (VmHWM, reset through /proc/self/clear_refs;
an upper bound, since memory freed by earlier models may still be resident).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from stacktrain.errors import InputError

from .measure import Tick, cuda_sync, measure, no_tick

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def model_api() -> SimpleNamespace:
    """The model registry (train.models, MONAI), or where MONAI is missing (the GPU script needs only
    torch, numpy, zarr, numcodecs and DALI) the torch-only ResNet3D-50 of benchmarks/resnet3d.py."""
    try:
        import monai  # noqa: F401
    except ImportError:
        from . import resnet3d

        def check(name, options=None):
            if name != "resnet3d50" or options:
                raise InputError(f"model {name!r} with options {options or {}}: without MONAI only resnet3d50 "
                                 "(no options) is available; install monai for the others")
        return SimpleNamespace(models=["resnet3d50"], check=check, source="benchmarks.resnet3d (MONAI missing)",
                               build=lambda name, tiny=False, options=None: resnet3d.ResNet3D50(),
                               card=lambda name, patch, tiny=False, options=None, batch=64: resnet3d.card(patch, batch))
    from stacktrain.train import models
    return SimpleNamespace(models=list(models.MODELS), check=models.check_model, source="train.models (MONAI)",
                           build=lambda name, tiny=False, options=None: models.build_model(
                               name, tiny=tiny, options=options),
                           card=models.model_card)


def defaults(cuda: bool) -> dict[str, Any]:
    """True size on a GPU; on a 2-core CPU the smallest patch every model takes (DenseNet divides each
    axis by 32 and its last BatchNorm needs more than one value), batch 1, 3 segments: about a minute."""
    if cuda:
        return {"patch": (32, 256, 256), "batch": 64, "precision": "bf16", "segments": 5}
    return {"patch": (32, 64, 64), "batch": 1, "precision": "fp32", "segments": 3}


def matmul_peak_tflops(device: torch.device, precision: str, *, segments: int = 3) -> float:
    """TFLOP/s of a large square matmul in the benchmark's precision: what the model could reach."""
    n = 8192 if device.type == "cuda" else 1024
    dtype = AUTOCAST[precision] or torch.float32
    if device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32  # CPU autocast runs most convolutions in fp32 anyway
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cuda" else 3

    def segment() -> int:
        for _ in range(reps):
            torch.mm(a, b)
        return reps
    r = measure(segment, label="matmul peak", segments=segments, warmup=1, sync=cuda_sync())
    return r["per_s"] * 2 * n ** 3 / 1e12


class PeakMemory:
    """Peak memory during a block: CUDA allocator high-water mark, or peak RSS on Linux CPUs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None
        self.device_used_bytes: int | None = None
        self.kind = "cuda max allocated" if device.type == "cuda" else "process peak RSS"

    @staticmethod
    def _hwm_kib() -> int | None:
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        except (OSError, StopIteration):
            return None

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            except OSError:
                pass

    def stop(self) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            free, total = torch.cuda.mem_get_info(self.device)  # everyone's: context, cuDNN workspaces, ...
            self.device_used_bytes = total - free
        elif (kib := self._hwm_kib()) is not None:
            self.peak_bytes = kib * 1024


def train_step_fn(model, x, y, precision: str):
    """Forward + backward of one batch (BCE with logits, as in training), parameters' grads cleared."""
    loss_fn = torch.nn.BCEWithLogitsLoss()
    dtype = AUTOCAST[precision]
    if x.device.type == "cpu" and dtype is not None:
        x = x.float()  # CPU autocast runs in fp32 here anyway

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        loss_fn(logits.float(), y).backward()
    return step


def bench_model(*, models: list[str] | None = None, patch=None, batch: int | None = None,
                precision: str | None = None, tiny: bool = False, options: dict | None = None,
                peak_tflops: float | None = None, channels_last: bool = False, segments: int | None = None,
                warmup: int = 1, steps_per_segment: int = 1, seed: int = 0, tick: Tick = no_tick) -> dict[str, Any]:
    api = model_api()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    d = defaults(cuda)
    patch, batch, precision = tuple(patch or d["patch"]), batch or d["batch"], precision or d["precision"]
    segments = segments or d["segments"]
    if precision not in AUTOCAST:
        raise ValueError(f"precision {precision!r}; choose bf16, fp16 or fp32")
    models = list(models or api.models)
    for name in models:
        api.check(name, options)
    peak_source = "given" if peak_tflops else "measured"
    peak = peak_tflops or matmul_peak_tflops(device, precision)
    torch.manual_seed(seed)
    rows = []
    for name in models:
        card = api.card(name, patch, tiny=tiny, options=options, batch=batch)
        row: dict[str, Any] = {"model": name, "tiny": tiny, "params": card["params"],
                               "train_gflop_per_patch": card["train_gflop"],
                               "forward_gflop_per_patch": card["forward_gflop"],
                               "estimated_train_memory_gib": card["train_memory_gib_at_batch"]}
        mem = PeakMemory(device)
        try:
            mem.start()
            model = api.build(name, tiny=tiny, options=options).to(device).train()
            memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
            model = model.to(memory_format=memory_format)
            # the input as training feeds it: normalised to the autocast dtype (bf16 for the seed preset)
            x = torch.randn(batch, 3, *patch, device=device, dtype=AUTOCAST[precision] or torch.float32)
            x = x.contiguous(memory_format=memory_format)
            y = torch.randint(0, 2, (batch, 1), device=device).float()
            step = train_step_fn(model, x, y, precision)

            def segment() -> int:
                for _ in range(steps_per_segment):
                    step()
                return steps_per_segment * batch
            r = measure(segment, label=f"model {name}", segments=segments, warmup=warmup, sync=cuda_sync(), tick=tick)
            mem.stop()
            achieved = card["train_gflop"] * r["per_s"] / 1e3
            row |= {"patches_per_s": r["per_s"], "segment_rates": r["segment_rates"], "cores_busy": r["cores_busy"],
                    "peak_memory_gib": mem.peak_bytes / 2**30 if mem.peak_bytes is not None else None,
                    "peak_memory_kind": mem.kind,
                    "device_used_gib": mem.device_used_bytes / 2**30 if mem.device_used_bytes is not None else None,
                    "achieved_tflops": achieved, "fraction_of_peak": achieved / peak}
        except torch.cuda.OutOfMemoryError as e:  # report it and go on with the other models
            row["error"] = f"out of memory at batch {batch}: {str(e).splitlines()[0]}"
        finally:
            model = x = y = step = None
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
    return {"bench": "model",
            "config": {"models": models, "patch": list(patch), "batch": batch, "precision": precision, "tiny": tiny,
                       "options": options or {}, "channels_last": channels_last, "segments": segments,
                       "warmup": warmup, "steps_per_segment": steps_per_segment,
                       "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                       "torch_threads": torch.get_num_threads(), "models_from": api.source},
            "matmul_peak_tflops": peak, "peak_source": peak_source, "results": rows}
