"""The pipelines' data source: a picklable, pure-numpy callable shared by DALI and the torch loader.

DALI calls it in batch mode from its parallel `external_source` workers with a BatchInfo
(epoch_idx, iteration); the torch Dataset calls `sample()` directly. Either way a sample is:
the chunks covering the patch's box (raw LZ4 bytes for the GPU, or decoded in the worker for the
CPU modes), how to reassemble them, where the patch sits in the region, the flips, the
normalization parameters and the side outputs. Every random choice comes from
`default_rng((seed, epoch, slot))`, so all loaders agree on every sample.
"""

from __future__ import annotations

import numpy as np

from stores import chunks as store_chunks
from stores.reader import Store

from .normalize import NormParams
from .patches import PatchIndex
from .plans import EpochPlan, eval_plan, train_plan

# Output order of the source (DALI's external_source takes them positionally).
RAW_FIELDS = ("data", "offsets", "sizes", "chunk_shape")  # GPU mode: inflate on the device
DECODED_FIELDS = ("chunks",)  # CPU modes: (n, cz, cy, cx), decoded by the worker
COMMON_FIELDS = ("dims7", "dims4", "anchor", "flips", "lo", "mul", "label", "stack_index", "position")


class PatchSource:
    """Samples of one rank's epochs. `raw_lz4=True` is GPU mode, False the decoded CPU mode."""

    def __init__(self, store: Store, index: PatchIndex, norm: list[NormParams], *, train: bool,
                 raw_lz4: bool, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 balance: bool = False, flip=(False, False, False), jitter: int = 0,
                 epoch_offset: int = 0):
        self.store = store
        self.index = index
        self.norm = norm
        self.train = train
        self.raw_lz4 = raw_lz4
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.balance = balance
        self.flip = np.asarray(flip, bool)
        self.jitter = int(jitter)
        self.epoch_offset = epoch_offset  # DALI counts epochs from 0 per pipeline; we may start later
        self.fields = (RAW_FIELDS if raw_lz4 else DECODED_FIELDS) + COMMON_FIELDS
        self._plans: dict[int, EpochPlan] = {}
        self._extent = np.array([store.meta(s).shape[1:] for s in index.stack_ids], np.int64)

    # -- plans ---------------------------------------------------------------------------------
    def plan(self, epoch: int) -> EpochPlan:
        """This rank's plan for `epoch` (the eval plan ignores the epoch). Cached: workers ask per batch."""
        key = epoch if self.train else 0
        plan = self._plans.get(key)
        if plan is None:
            if self.train:
                plan = train_plan(self.index.label, seed=self.seed, epoch=epoch, batch_size=self.batch_size,
                                  rank=self.rank, world_size=self.world_size, balance=self.balance)
            else:
                plan = eval_plan(len(self.index), batch_size=self.batch_size, rank=self.rank,
                                 world_size=self.world_size)
            self._plans = {key: plan}  # one epoch at a time; the previous one is done
        return plan

    def __call__(self, info) -> tuple[list[np.ndarray], ...]:
        """DALI batch-mode callback: the batch `info.iteration` of epoch `epoch_offset + epoch_idx`."""
        epoch = self.epoch_offset + info.epoch_idx
        rows, slots = self.plan(epoch).batch(info.iteration)
        if len(rows) == 0:
            raise StopIteration
        samples = [self.sample(epoch, int(slot), int(row)) for row, slot in zip(rows, slots)]
        return tuple(list(column) for column in zip(*samples))

    # -- one sample ----------------------------------------------------------------------------
    def augmentation(self, epoch: int, slot: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(crop origin z, y, x; flips z, y, x as 0/1) for one sample; the grid position in eval."""
        position = self.index.position[row]
        flips = np.zeros(3, np.int32)
        if not self.train:
            return position.copy(), flips
        rng = np.random.default_rng((self.seed, epoch, slot))
        start = position.copy()
        if self.jitter:
            shift = rng.integers(-self.jitter, self.jitter, endpoint=True, size=3)
            # stay inside the stack; a pad-edge patch may keep running past the edge as planned
            hi = np.maximum(position, self._extent[self.index.stack[row]] - np.asarray(self.index.size))
            start = np.clip(position + shift, 0, hi)
        flips = ((rng.random(3) < 0.5) & self.flip).astype(np.int32)
        return start, flips

    def sample(self, epoch: int, slot: int, row: int) -> tuple[np.ndarray, ...]:
        """One sample's arrays in `self.fields` order."""
        stack = int(self.index.stack[row])
        start, flips = self.augmentation(epoch, slot, row)
        box = tuple((int(s), int(s) + n) for s, n in zip(start, self.index.size))
        region = self.store.chunk_region(self.index.stack_ids[stack], box, raw_lz4=self.raw_lz4)
        if self.raw_lz4:
            head = (region.data, region.offsets, region.sizes, np.asarray(region.chunk_zyx, np.int32))
        else:
            head = (store_chunks.decode(region),)
        anchor = np.array([0, *(s - o for s, o in zip(start, region.origin_zyx))], np.int32)
        lo, mul = self.norm[stack]
        return (*head,
                np.asarray(store_chunks.reassemble_dims(region.grid, region.chunk_zyx), np.int32),
                np.asarray(region.region_shape, np.int32),
                anchor, flips, lo, mul,
                np.array(self.index.label[row], np.float32),
                np.array(stack, np.int64),
                start.astype(np.int64))
