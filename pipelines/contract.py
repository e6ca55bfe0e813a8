"""The batch contract at the pipelines -> train boundary: one type, checked once per batch.

Loaders deliver the cropped, flipped patches in the store dtype; the trainer's input step
(`train.step.to_model_input`) normalises them on the training device with `pipelines.normalize`.

| field         | dtype                          | shape            | device              |
|---------------|--------------------------------|------------------|---------------------|
| `images`      | uint8 / uint16 (the store's)   | (N, C, D, H, W)  | the loader's device |
| `labels`      | float32, 0 = SAIN, 1 = MALADE  | (N,)             | same as images      |
| `stack_index` | int64, index into `stack_ids`  | (N,)             | same as images      |
| `position`    | int64, patch origin (z, y, x)  | (N, 3)           | same as images      |
| `lo`, `mul`   | float32, per sample, channel   | (N, C, 1, 1, 1)  | same as images      |

`norm` (a `NormSpec`, the same for every batch of a loader) says what normalising them gives:
`(images - lo) * mul`, clipped to [0, 1] when `clip`, in `dtype`, channels_last_3d when asked.
N may be smaller than the batch size only for the last batch of an eval epoch.
"""

from __future__ import annotations

import dataclasses

import torch

from stacktrain.errors import BatchContractError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
RAW_DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16}


@dataclasses.dataclass(frozen=True)
class NormSpec:
    """How a loader's raw images become model input (pipelines/normalize.py applies it)."""

    dtype: torch.dtype  # bf16 / fp16 / fp32
    clip: bool = False
    channels_last: bool = False


@dataclasses.dataclass
class Batch:
    images: torch.Tensor  # raw, store dtype
    labels: torch.Tensor
    stack_index: torch.Tensor
    position: torch.Tensor
    lo: torch.Tensor
    mul: torch.Tensor
    norm: NormSpec = NormSpec(torch.float32)

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What the trainer expects: channels, patch size (D, H, W), raw dtype, normalised dtype, device type."""

    channels: int
    patch_dhw: tuple[int, int, int]
    dtype: torch.dtype  # what normalisation produces
    device_type: str  # "cpu" or "cuda"
    max_batch: int
    raw_dtype: torch.dtype = torch.uint8
    clip: bool = False
    channels_last: bool = False

    @property
    def norm(self) -> NormSpec:
        return NormSpec(self.dtype, self.clip, self.channels_last)


def check_batch(batch: Batch, spec: BatchSpec) -> None:
    """Raise BatchContractError listing every field that differs from `spec`, expected vs actual."""
    problems = []
    im = batch.images
    n = im.shape[0] if im.dim() else -1
    c = spec.channels
    want_shape = ("N", c, *spec.patch_dhw)
    if im.dim() != 5 or tuple(im.shape[1:]) != (c, *spec.patch_dhw):
        problems.append(f"images.shape: expected {want_shape}, got {tuple(im.shape)}")
    if not 0 < n <= spec.max_batch:
        problems.append(f"batch size: expected 1..{spec.max_batch}, got {n}")
    if im.dtype != spec.raw_dtype:
        problems.append(f"images.dtype: expected {spec.raw_dtype} (the store's), got {im.dtype}")
    fields = (("labels", torch.float32, (n,)), ("stack_index", torch.int64, (n,)),
              ("position", torch.int64, (n, 3)), ("lo", torch.float32, (n, c, 1, 1, 1)),
              ("mul", torch.float32, (n, c, 1, 1, 1)))
    for name, dtype, shape in fields:
        t = getattr(batch, name)
        if t.dtype != dtype:
            problems.append(f"{name}.dtype: expected {dtype}, got {t.dtype}")
        if tuple(t.shape) != shape:
            problems.append(f"{name}.shape: expected {shape}, got {tuple(t.shape)}")
    if batch.norm != spec.norm:
        problems.append(f"norm: expected {spec.norm}, got {batch.norm}")
    devices = {getattr(batch, name).device.type for name in ("images", *(f[0] for f in fields))}
    if devices != {spec.device_type}:
        problems.append(f"device: expected every field on {spec.device_type}, got {sorted(devices)}")
    if problems:
        raise BatchContractError("batch does not match the contract (pipelines/contract.py):\n  "
                                 + "\n  ".join(problems))
