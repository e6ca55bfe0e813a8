"""Configuration of patches, preprocessing and loading: frozen keyword-only dataclasses.

These are sections of the one training config (train/config.py loads them from TOML); each field's
docstring-comment is what the README's config table shows.
"""

from __future__ import annotations

import dataclasses

from stacktrain.choices import EdgePolicy, LoaderKind, Normalization, OutDtype, Sampling
from stacktrain.config import check_choices, require


@dataclasses.dataclass(frozen=True, kw_only=True)
class PatchConfig:
    size: tuple[int, int, int] = (32, 256, 256)
    """Patch depth, height, width in voxels (z, y, x)."""
    stride: tuple[int, int, int] | None = None
    """Grid step (z, y, x); None means the patch size (no overlap)."""
    edge: EdgePolicy = "fit"
    """fit: shift the last patch back so the stack is covered; drop: leave the rest; pad: zero-pad."""
    foreground_min: float = 0.0
    """Skip patches whose stored foreground fraction is below this (0 keeps all; reads no voxels)."""

    def __post_init__(self):
        check_choices(self, "patch")
        object.__setattr__(self, "size", tuple(self.size))
        if self.stride is not None:
            object.__setattr__(self, "stride", tuple(self.stride))
        require(all(n >= 1 for n in self.size), "patch.size", self.size, "every size must be at least 1")
        require(all(n >= 1 for n in self.step), "patch.stride", self.stride, "every step must be at least 1")
        require(self.foreground_min >= 0, "patch.foreground_min", self.foreground_min, "give 0 (keep all) or more")

    @property
    def step(self) -> tuple[int, int, int]:
        return self.stride or self.size


@dataclasses.dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    normalize: Normalization = "scale"
    """scale: divide by the dtype's max to [0, 1]; meanstd: per-channel (x - mean) / std;
    percentile: clip each stack to its stored [low, high] percentiles per channel, then to [0, 1]."""
    mean: tuple[float, ...] | None = None
    """Per-channel means for meanstd, in raw intensity units; None computes them from the training stacks."""
    std: tuple[float, ...] | None = None
    """Per-channel stds for meanstd; None computes them from the training stacks."""
    percentile_low: float = 1.0
    """Lower clip percentile for `percentile` (one of the stored 0.5, 1, 99, 99.5)."""
    percentile_high: float = 99.0
    """Upper clip percentile for `percentile`."""
    flip: tuple[bool, bool, bool] = (True, True, True)
    """Random flips along z, y, x during training (each with probability 0.5)."""
    jitter: int = 0
    """Random shift of the training crop by up to this many voxels per axis, inside the stack."""

    def __post_init__(self):
        check_choices(self, "preprocess")
        object.__setattr__(self, "flip", tuple(self.flip))
        require(self.jitter >= 0, "preprocess.jitter", self.jitter, "give 0 (off) or a positive shift in voxels")
        require(self.percentile_low < self.percentile_high, "preprocess.percentile_low", self.percentile_low,
                f"must be below preprocess.percentile_high ({self.percentile_high})")
        for key in ("percentile_low", "percentile_high"):
            value = getattr(self, key)
            require(0 <= value <= 100, f"preprocess.{key}", value, "give a percentile in [0, 100]")
        require(self.std is None or all(v > 0 for v in self.std), "preprocess.std", self.std, "every std must be > 0")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoaderConfig:
    loader: LoaderKind = "auto"
    """dali (GPU decode), dali-cpu (same graph on the CPU), torch (reference DataLoader), auto (dali
    when a GPU and DALI are present, else dali-cpu, else torch)."""
    batch_size: int = 64
    """Patches per batch (per rank under DDP)."""
    workers: int = 2
    """Worker processes reading chunk bytes (and decompressing them in CPU modes)."""
    prefetch: int = 2
    """Batches prepared ahead of the model."""
    dtype: OutDtype = "bf16"
    """dtype the images are normalised to on the training device: bf16, fp16 or fp32 (fp32 is what CPU
    training uses); the loaders themselves deliver the store dtype (uint8/uint16)."""
    channels_last: bool = False
    """Normalise images into the torch.channels_last_3d memory format (on the device, in the same copy)."""
    balance: bool = False
    """Class-balanced sampling of training patches (each epoch draws equally from SAIN and MALADE)."""
    sampling: Sampling = "patch"
    """patch: every training patch weighs the same (one shuffled pass per epoch); per-stack: every
    training stack draws an equal share of the epoch (a stack of 4,500 patches weighs as much as one of
    20), within each class when `balance` is on too."""
    steps_per_epoch: int = 0
    """Optimizer steps (batches per rank) in a training epoch; 0: as many as one pass over the training
    patches fills. Fix it to give every variant of a study the same budget when their patch counts
    differ (overlapping strides, the foreground filter, balancing)."""
    seed: int = 0
    """Seed of the per-epoch shuffle and augmentation; epoch e uses (seed, e)."""

    def __post_init__(self):
        check_choices(self, "loader")
        require(self.batch_size >= 1, "loader.batch_size", self.batch_size, "give at least 1")
        require(self.workers >= 0, "loader.workers", self.workers, "give 0 (read in this process) or more")
        require(self.prefetch >= 1, "loader.prefetch", self.prefetch, "give at least 1 batch")
        require(self.seed >= 0, "loader.seed", self.seed, "give 0 or more")
        require(self.steps_per_epoch >= 0, "loader.steps_per_epoch", self.steps_per_epoch,
                "give 0 (one pass over the patches) or more")
