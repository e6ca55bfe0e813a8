"""The naive baseline: the loader most users would write, a torch DataLoader over zarr-python.

Each item opens the stack's level-0 array with `zarr.open` (once per worker, which is kinder than
once per item), reads the patch region through zarr's public slicing API, flips it as the pipelines'
source chose, and delivers it as the loaders do: the raw patch in the store dtype (normalising is the
trainer's input step, on the device, for every loader alike). Same patches, same workers, same batch
size as the loaders it is compared with.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from stacktrain.pipelines.workers import start_method


class ZarrPatchDataset(Dataset):
    def __init__(self, array_paths: list[str], items, size_zyx):
        self.array_paths = array_paths
        self.items = items  # (stack, (z, y, x), flips (3,)) per patch, every segment's patches
        self.size = tuple(size_zyx)
        self._arrays = {}

    def __len__(self) -> int:
        return len(self.items)

    def _array(self, stack: int):
        arr = self._arrays.get(stack)
        if arr is None:
            import zarr
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numcodecs' LZ4 is not a v3 core codec: noise here
                arr = self._arrays[stack] = zarr.open(self.array_paths[stack], mode="r")
        return arr

    def __getitem__(self, i: int) -> torch.Tensor:
        stack, (z, y, x), flips = self.items[i]
        d, h, w = self.size
        patch = self._array(stack)[:, z:z + d, y:y + h, x:x + w]
        axes = tuple(axis + 1 for axis, f in enumerate(flips) if f)
        if axes:
            patch = np.flip(patch, axes)
        return torch.from_numpy(np.ascontiguousarray(patch))


class RangeBatches(Sampler):
    """Batches of item numbers [start, stop); the benchmark sets the range before each segment."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.range = (0, 0)

    def __iter__(self):
        start, stop = self.range
        for i in range(start, stop, self.batch_size):
            yield list(range(i, min(i + self.batch_size, stop)))

    def __len__(self) -> int:
        start, stop = self.range
        return -(-(stop - start) // self.batch_size)


def naive_loader(dataset: ZarrPatchDataset, *, batch_size: int, workers: int, prefetch: int,
                 pin_memory: bool) -> DataLoader:
    sampler = RangeBatches(batch_size)
    context = start_method() if workers else None
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                      prefetch_factor=prefetch if workers else None, pin_memory=pin_memory,
                      multiprocessing_context=context)
