"""The reference loader: a plain torch Dataset/DataLoader over the same source, no DALI.

It reads the same samples as dali-cpu (the source's workers decode, reassemble, crop and flip the
patch in numpy) and batches them with torch's DataLoader: raw patches in the store dtype with their
normalisation parameters, like every loader. It is the fallback where DALI does not import (e.g.
macOS). The DataLoader is built once with persistent workers; the batch sampler hands the workers
(epoch, slot, row) keys, so the workers need no plan of their own.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from stacktrain import signals

from .base import PatchLoader
from .contract import Batch
from .source import PatchSource
from .workers import start_method

FIELDS = ("patch", "lo", "mul", "label", "stack_index", "position")


class PatchDataset(Dataset):
    """Items are keyed by (epoch, slot, row) so augmentation matches the DALI loaders exactly."""

    def __init__(self, source: PatchSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source.index)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, torch.Tensor]:
        epoch, slot, row = key
        sample = dict(zip(self.source.fields, self.source.sample(epoch, slot, row)))
        return {k: torch.from_numpy(sample[k]) for k in FIELDS}


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

    def __init__(self, *, device: torch.device, **common):
        super().__init__(**common)
        self.device = device
        cfg = self.cfg
        self._sampler = EpochBatchSampler(self.source)
        workers = cfg.workers
        context = start_method() if workers else None
        self._loader = DataLoader(
            PatchDataset(self.source), batch_sampler=self._sampler,
            num_workers=workers, persistent_workers=workers > 0,
            prefetch_factor=cfg.prefetch if workers else None, pin_memory=device.type == "cuda",
            multiprocessing_context=context, worker_init_fn=signals.loader_worker if workers else None)

    def _batches(self, epoch: int) -> Iterator[Batch]:
        if self._loader is None:
            raise RuntimeError("this loader is closed")
        self._sampler.epoch = epoch
        for item in self._loader:
            t = {k: v.to(self.device, non_blocking=True) for k, v in item.items()}
            yield Batch(t["patch"], t["label"], t["stack_index"], t["position"], t["lo"], t["mul"])

    def close(self) -> None:
        self._loader = None  # persistent workers stop when their iterator is collected
