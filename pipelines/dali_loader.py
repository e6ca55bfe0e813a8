"""The DALI loaders: GPU mode ("dali") and CPU mode ("dali-cpu") over one graph and one source.

One pipeline per rank, on that rank's device, built once and reset per epoch. DALI numbers epochs
from 0 per pipeline, so the source maps them onto ours with an offset; the pipeline is rebuilt only
when the trainer asks for an epoch out of sequence (resume, repeat) or abandoned the last one midway
(DALI iterators cannot be reset mid-epoch).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .base import PatchLoader
from .contract import Batch
from .graph import OUTPUT_MAP, build_pipeline
from .workers import start_method


class DaliLoader(PatchLoader):
    def __init__(self, *, gpu: bool, device: torch.device, store_dtype: str, **common):
        super().__init__(**common)
        self.kind = "dali" if gpu else "dali-cpu"
        self.device = device
        self._gpu = gpu
        self._store_dtype = store_dtype
        self._pipe = None
        self._iterator = None
        self._next_epoch: int | None = None  # the epoch the built pipeline delivers next, if clean

    def _build(self, epoch: int) -> None:
        self._release()
        source = copy.copy(self.source)
        source.epoch_offset = epoch if source.train else 0
        cfg = self.cfg
        self._pipe = build_pipeline(
            source, gpu=self._gpu, device_id=self.device.index if self._gpu else None,
            batch_size=cfg.batch_size, workers=cfg.workers, prefetch=cfg.prefetch,
            store_dtype=self._store_dtype, patch_cdhw=(self.spec.channels, *self.spec.patch_dhw), seed=cfg.seed,
            start_method=start_method(gpu=self._gpu))
        self._iterator = DALIGenericIterator([self._pipe], OUTPUT_MAP, last_batch_policy=LastBatchPolicy.PARTIAL,
                                             prepare_first_batch=False, auto_reset=False)
        self._next_epoch = epoch

    def _batches(self, epoch: int) -> Iterator[Batch]:
        if len(self) == 0:  # a rank with no eval patches: nothing to run
            return
        wanted = epoch if self.source.train else self._next_epoch  # eval epochs are all the same
        if self._iterator is None or self._next_epoch is None or wanted != self._next_epoch:
            self._build(epoch)
        self._next_epoch = None  # dirty until the epoch is read to the end
        raw = self.spec.raw_dtype
        for (out,) in self._iterator:
            images = out["images"]
            if images.dtype != raw:  # uint16 travels as int16 (graph.DALI_TORCH_VIEW): same bytes
                images = images.view(raw)
            yield Batch(images, out["label"], out["stack_index"], out["position"], out["lo"], out["mul"])
        self._iterator.reset()
        self._next_epoch = epoch + 1 if self.source.train else 0

    def _release(self) -> None:
        """Stop the pipeline, then its workers, now (DALI would do both when the pipeline is collected)."""
        self._iterator = None
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            getattr(pipe, "_shutdown", lambda: None)()
            pool = getattr(pipe, "_py_pool", None)
            if pool is not None:
                pool.close()

    def close(self) -> None:
        self._release()
        self._next_epoch = None
