"""The one normalisation: parameters per stack, and the torch function every loader's batches go through.

Every mode is `(x - lo) * mul` per channel in float32, clipped to [0, 1] for percentile, then cast to
the training dtype. The loaders deliver raw patches (store dtype) with `lo`, `mul` per sample; the
trainer's input step (`train.step.to_model_input`) runs `normalize_images` on the training device after
the host->device copy, so every loader shares this exact code. On CUDA it is one `torch.compile`d kernel
(uint8 in, bf16 out); on the CPU the same operations run eagerly. `(x - lo) * mul` ends in a multiply,
so no fused multiply-add can change its rounding: fp32 results equal the numpy reference bit for bit.
- scale:      lo = 0,                mul = 1 / dtype max
- meanstd:    lo = mean,             mul = 1 / std        (values given, or from the training stacks)
- percentile: lo = stack's p_low,    mul = 1 / (p_high - p_low), then clip to [0, 1]
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from stacktrain.errors import PipelineError
from stacktrain.stores.layout import PERCENTILES
from stacktrain.stores.reader import Store

from .config import PreprocessConfig

NormParams = tuple[np.ndarray, np.ndarray]  # lo, mul: float32 (C, 1, 1, 1)


def channel_mean_std(store: Store, stack_ids) -> tuple[list[float], list[float]]:
    """Per-channel mean and std over every voxel of `stack_ids`, from the sums stored at conversion."""
    metas = [store.meta(s) for s in stack_ids]
    if not metas:
        raise PipelineError(f"{store.path}: no stacks to compute channel mean/std from")
    n = float(sum(m.n_voxels for m in metas))
    total = np.sum([m.channel_sum for m in metas], axis=0, dtype=np.float64)
    total_sq = np.sum([m.channel_sumsq for m in metas], axis=0, dtype=np.float64)
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean * mean, 0.0))
    return mean.tolist(), np.maximum(std, 1e-6).tolist()


def _as_params(lo, mul, channels: int) -> NormParams:
    shape = (channels, 1, 1, 1)
    return tuple(np.array(np.broadcast_to(np.asarray(v, np.float32).reshape(-1, 1, 1, 1), shape))  # own, writable
                 for v in (lo, mul))


def _percentile_key(p: float, store: Store, sid: str, stored: dict) -> str:
    key = f"p{p:g}"
    if key not in stored:
        raise PipelineError(f"{store.path}: stack {sid!r} has no stored percentile {p:g}; "
                            f"preprocess.percentile_low/high must be one of {', '.join(f'{q:g}' for q in PERCENTILES)}")
    return key


def stack_norm_params(store: Store, stack_ids: list[str], prep: PreprocessConfig, *, train: bool,
                      norm_stats: tuple[list[float], list[float]] | None = None
                      ) -> tuple[list[NormParams], bool]:
    """(lo, mul) for each stack in `stack_ids` order, and whether to clip to [0, 1]."""
    metas = [store.meta(s) for s in stack_ids]
    channels = metas[0].shape[0]
    if prep.normalize == "scale":
        return [_as_params(0.0, 1.0 / np.iinfo(m.dtype).max, channels) for m in metas], False
    if prep.normalize == "percentile":
        out = []
        for sid, m in zip(stack_ids, metas):
            lo = np.asarray(m.percentiles[_percentile_key(prep.percentile_low, store, sid, m.percentiles)])
            hi = np.asarray(m.percentiles[_percentile_key(prep.percentile_high, store, sid, m.percentiles)])
            out.append(_as_params(lo, 1.0 / np.maximum(hi - lo, 1.0), channels))
        return out, True
    # meanstd: explicit values win, then the caller's (training) statistics, then these stacks.
    if prep.mean is not None and prep.std is not None:
        mean, std = list(prep.mean), list(prep.std)
    elif norm_stats is not None:
        mean, std = norm_stats
    elif train:
        mean, std = channel_mean_std(store, stack_ids)
    else:
        raise PipelineError("preprocess.normalize = \"meanstd\" for an eval loader needs the training "
                            "stacks' statistics: pass norm_stats=channel_mean_std(store, train_ids) or "
                            "set preprocess.mean and preprocess.std")
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise PipelineError(f"meanstd needs {channels} means and {channels} positive stds (one per "
                            f"channel); got mean={list(mean)}, std={list(std)}")
    params = _as_params(mean, 1.0 / np.asarray(std, np.float64), channels)
    return [params] * len(metas), False


def apply_numpy(x: np.ndarray, lo: np.ndarray, mul: np.ndarray, clip: bool) -> np.ndarray:
    """The reference: the same float32 operations `normalize_images` runs."""
    out = (x.astype(np.float32) - lo) * mul
    return np.clip(out, np.float32(0), np.float32(1)) if clip else out


def _normalize(raw: torch.Tensor, lo: torch.Tensor, mul: torch.Tensor, clip: bool, dtype: torch.dtype,
               channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = raw.to(dtype=torch.float32, memory_format=fmt)  # widen and lay out in one copy
    x = (x - lo) * mul
    if clip:
        x = x.clamp(0.0, 1.0)
    return x.to(dtype).contiguous(memory_format=fmt)


_COMPILED = {"fn": None, "failed": False}


def _compiled():
    if _COMPILED["fn"] is None:
        _COMPILED["fn"] = torch.compile(_normalize, dynamic=True)  # the last eval batch is smaller
    return _COMPILED["fn"]


def normalize_images(raw: torch.Tensor, lo: torch.Tensor, mul: torch.Tensor, *, clip: bool,
                     dtype: torch.dtype = torch.float32, channels_last: bool = False,
                     fuse: bool | None = None) -> torch.Tensor:
    """(N, C, D, H, W) uint8/uint16 -> `(raw - lo) * mul` (clipped to [0, 1] if `clip`) in `dtype`.

    `lo`, `mul`: float32 (N, C, 1, 1, 1) on raw's device. `fuse` (default: on CUDA) runs it as one
    compiled kernel; if compiling fails it warns once and runs eagerly (same operations)."""
    if lo.device != raw.device or mul.device != raw.device:
        lo, mul = lo.to(raw.device, non_blocking=True), mul.to(raw.device, non_blocking=True)
    fuse = raw.is_cuda if fuse is None else fuse
    if fuse and not _COMPILED["failed"]:
        try:
            return _compiled()(raw, lo, mul, clip, dtype, channels_last)
        except Exception as e:  # noqa: BLE001 -- no compiler on this node: the eager path is the same maths
            _COMPILED["failed"] = True
            warnings.warn(f"normalisation: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0]}); "
                          "normalising eagerly (a few kernels instead of one)", stacklevel=2)
    return _normalize(raw, lo, mul, clip, dtype, channels_last)
