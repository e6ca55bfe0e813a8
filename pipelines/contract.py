"""The batch contract at the pipelines -> train boundary: one type, checked once per batch.

| field         | dtype                          | shape          | device                      |
|---------------|--------------------------------|----------------|-----------------------------|
| `images`      | bfloat16 / float16 / float32   | (N, C, D, H, W) | the loader's device         |
| `labels`      | float32, 0 = SAIN, 1 = MALADE  | (N,)           | same as images              |
| `stack_index` | int64, index into `stack_ids`  | (N,)           | same as images              |
| `position`    | int64, patch origin (z, y, x)  | (N, 3)         | same as images              |

N may be smaller than the batch size only for the last batch of an eval epoch.
"""

from __future__ import annotations

import dataclasses

import torch

from stacktrain.errors import BatchContractError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}




@dataclasses.dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    stack_index: torch.Tensor
    position: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What the trainer expects: channels, patch size (D, H, W), image dtype and device type."""

    channels: int
    patch_dhw: tuple[int, int, int]
    dtype: torch.dtype
    device_type: str  # "cpu" or "cuda"
    max_batch: int


def check_batch(batch: Batch, spec: BatchSpec) -> None:
    """Raise BatchContractError listing every field that differs from `spec`, expected vs actual."""
    problems = []
    im = batch.images
    n = im.shape[0] if im.dim() else -1
    want_shape = ("N", spec.channels, *spec.patch_dhw)
    if im.dim() != 5 or tuple(im.shape[1:]) != (spec.channels, *spec.patch_dhw):
        problems.append(f"images.shape: expected {want_shape}, got {tuple(im.shape)}")
    if not 0 < n <= spec.max_batch:
        problems.append(f"batch size: expected 1..{spec.max_batch}, got {n}")
    if im.dtype != spec.dtype:
        problems.append(f"images.dtype: expected {spec.dtype}, got {im.dtype}")
    for name, dtype, shape in (("labels", torch.float32, (n,)), ("stack_index", torch.int64, (n,)),
                               ("position", torch.int64, (n, 3))):
        t = getattr(batch, name)
        if t.dtype != dtype:
            problems.append(f"{name}.dtype: expected {dtype}, got {t.dtype}")
        if tuple(t.shape) != shape:
            problems.append(f"{name}.shape: expected {shape}, got {tuple(t.shape)}")
    devices = {t.device.type for t in (im, batch.labels, batch.stack_index, batch.position)}
    if devices != {spec.device_type}:
        problems.append(f"device: expected every field on {spec.device_type}, got {sorted(devices)}")
    if problems:
        raise BatchContractError("batch does not match the contract (pipelines/contract.py):\n  "
                                 + "\n  ".join(problems))
