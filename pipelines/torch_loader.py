"""The reference loader: a plain torch Dataset/DataLoader over the same source, numpy all the way.

It reads the same samples as DALI (decoded chunks, anchor, flips, normalization parameters) and
finishes them with numpy: `stores.chunks.reassemble` -> crop -> flip -> normalize. It is the
benchmarks' baseline and the fallback where DALI does not import (e.g. macOS).
The DataLoader is built once with persistent workers; the batch sampler hands the workers
(epoch, slot, row) keys, so the workers need no plan of their own.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from stacktrain.stores.chunks import reassemble

from .base import PatchLoader
from .contract import DTYPES, Batch
from .normalize import apply_numpy
from .source import PatchSource
from .workers import start_method


def finish_numpy(sample: dict[str, np.ndarray], patch_dhw, clip: bool) -> np.ndarray:
    """A decoded-mode sample -> the float32 (C, D, H, W) patch: what the DALI graph computes."""
    region = reassemble(sample["chunks"], tuple(int(g) for g in sample["dims7"][:4]))
    _, z, y, x = (int(a) for a in sample["anchor"])
    d, h, w = patch_dhw
    patch = region[:, z:z + d, y:y + h, x:x + w]
    for axis, flipped in enumerate(sample["flips"], start=1):
        if flipped:
            patch = np.flip(patch, axis=axis)
    return apply_numpy(patch, sample["lo"], sample["mul"], clip)


class PatchDataset(Dataset):
    """Items are keyed by (epoch, slot, row) so augmentation matches the DALI loaders exactly."""

    def __init__(self, source: PatchSource, clip: bool, dtype: torch.dtype):
        self.source = source
        self.clip = clip
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.source.index)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        epoch, slot, row = key
        sample = dict(zip(self.source.fields, self.source.sample(epoch, slot, row)))
        image = finish_numpy(sample, self.source.index.size, self.clip)
        return {"images": torch.from_numpy(image).to(self.dtype),
                "labels": torch.from_numpy(sample["label"]),
                "stack_index": torch.from_numpy(sample["stack_index"]),
                "position": torch.from_numpy(sample["position"])}


class EpochBatchSampler(Sampler):
    """Yields this rank's batches of `epoch` as lists of (epoch, slot, row); set `epoch` before iterating."""

    def __init__(self, source: PatchSource):
        self.source = source
        self.epoch = 0

    def __iter__(self):
        plan = self.source.plan(self.epoch)
        for i in range(len(plan)):
            rows, slots = plan.batch(i)
            yield [(self.epoch, int(s), int(r)) for r, s in zip(rows, slots)]

    def __len__(self) -> int:
        return len(self.source.plan(self.epoch))


class TorchLoader(PatchLoader):
    kind = "torch"

    def __init__(self, *, device: torch.device, clip: bool, **common):
        super().__init__(**common)
        self.device = device
        cfg = self.cfg
        self._sampler = EpochBatchSampler(self.source)
        workers = cfg.workers
        context = start_method() if workers else None
        self._loader = DataLoader(
            PatchDataset(self.source, clip, DTYPES[cfg.dtype]), batch_sampler=self._sampler,
            num_workers=workers, persistent_workers=workers > 0,
            prefetch_factor=cfg.prefetch if workers else None, pin_memory=device.type == "cuda",
            multiprocessing_context=context)

    def _batches(self, epoch: int) -> Iterator[Batch]:
        if self._loader is None:
            raise RuntimeError("this loader is closed")
        self._sampler.epoch = epoch
        for item in self._loader:
            t = {k: v.to(self.device, non_blocking=True) for k, v in item.items()}
            yield Batch(t["images"], t["labels"], t["stack_index"], t["position"])

    def close(self) -> None:
        self._loader = None  # persistent workers stop when their iterator is collected
