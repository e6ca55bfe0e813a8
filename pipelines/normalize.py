"""Normalization parameters: every mode is `(x - lo) * mul` per channel, clipped to [0, 1] for percentile.

One formula for all modes keeps the DALI graph, the torch reference and the tests' numpy in step
(exactly the same float32 operations, so fp32 results are bit-identical):
- scale:      lo = 0,                mul = 1 / dtype max
- meanstd:    lo = mean,             mul = 1 / std        (values given, or from the training stacks)
- percentile: lo = stack's p_low,    mul = 1 / (p_high - p_low), then clip to [0, 1]
"""

from __future__ import annotations

import numpy as np

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
    return tuple(np.ascontiguousarray(np.broadcast_to(np.asarray(v, np.float32).reshape(-1, 1, 1, 1), shape))
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
    """The reference: the same float32 operations the DALI graph runs."""
    out = (x.astype(np.float32) - lo) * mul
    return np.clip(out, np.float32(0), np.float32(1)) if clip else out
