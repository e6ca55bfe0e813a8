"""The pipelines' data source: a picklable, pure-numpy callable shared by DALI and the torch loader.

DALI calls it in batch mode from its parallel `external_source` workers with a BatchInfo
(epoch_idx, iteration); the torch Dataset calls `sample()` directly. Either way a sample is:
the chunks covering the patch's box (raw LZ4 bytes for the GPU, or decoded in the worker for the
CPU modes), how to reassemble them, where the patch sits in the region, the flips, the
normalization parameters and the side outputs. Every random choice comes from
`default_rng((seed, epoch, slot))`, so all loaders agree on every sample.

CPU modes: the worker also reassembles, crops and flips, in one strided numpy copy (flips folded
into the reassembly), and hands over the finished patch in the store dtype: the CPU graph has no
operator left to run (DALI's CPU operators did that work several times slower than one numpy copy,
and normalisation now runs in torch on the training device: pipelines/normalize.py).
GPU mode hands over the compressed blocks, split into `inflate_groups` chunk lists per sample
(pipelines/inflate.py: CUDA's grid limit), and the graph inflates, reassembles, crops and flips.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys

import numpy as np

from stacktrain.stores import chunks as store_chunks
from stacktrain.stores.buffers import pooled
from stacktrain.stores.reader import Store

from .inflate import split_chunks
from .normalize import NormParams
from .patches import PatchIndex
from .plans import EpochPlan, eval_plan, train_plan

_GUARDED_PID = None


def exit_with_parent() -> None:
    """In a worker process, ask Linux to end it when its parent dies (PR_SET_PDEATHSIG): a trainer
    killed with -9 must not leave DALI workers behind holding its pipes. Once per process."""
    global _GUARDED_PID
    pid = os.getpid()
    if _GUARDED_PID == pid:
        return
    _GUARDED_PID = pid
    if sys.platform != "linux" or multiprocessing.parent_process() is None:
        return  # the main process itself, or not Linux: nothing to do
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the call above
        os._exit(1)


# Output order of the source (DALI's external_source takes them positionally).
GEOMETRY_FIELDS = ("chunk_shape", "dims7", "dims4", "anchor", "flips")  # GPU mode: what the graph does
DECODED_FIELDS = ("patch",)  # CPU modes: the finished (C, D, H, W) patch in the store dtype
SIDE_FIELDS = ("lo", "mul", "label", "stack_index", "position")  # side outputs, in the batch's order


def raw_fields(groups: int) -> tuple[str, ...]:
    """GPU mode's leading fields: the blocks, then each inflate group's chunk offsets and sizes."""
    return ("data", *(f"{kind}_{k}" for k in range(groups) for kind in ("offsets", "sizes")))


class PatchSource:
    """Samples of one rank's epochs. `raw_lz4=True` is GPU mode, False the decoded CPU mode."""

    def __init__(self, store: Store, index: PatchIndex, norm: list[NormParams], *, train: bool,
                 raw_lz4: bool, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 balance: bool = False, sampling: str = "patch", steps_per_epoch: int = 0,
                 flip=(False, False, False), jitter: int = 0,
                 epoch_offset: int = 0, inflate_groups: int = 1, patch_dtype: str | None = None):
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
        self.per_stack = sampling == "per-stack"
        self.steps_per_epoch = steps_per_epoch
        self.flip = np.asarray(flip, bool)
        self.jitter = int(jitter)
        self.epoch_offset = epoch_offset  # DALI counts epochs from 0 per pipeline; we may start later
        self.inflate_groups = int(inflate_groups)
        self.patch_dtype = patch_dtype  # CPU modes: patches of narrower stacks are widened to it (torch mixes)
        head = raw_fields(self.inflate_groups) + GEOMETRY_FIELDS if raw_lz4 else DECODED_FIELDS
        self.fields = head + SIDE_FIELDS
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
                                  rank=self.rank, world_size=self.world_size, balance=self.balance,
                                  stacks=self.index.stack, per_stack=self.per_stack, steps=self.steps_per_epoch)
            else:
                plan = eval_plan(len(self.index), batch_size=self.batch_size, rank=self.rank,
                                 world_size=self.world_size)
            self._plans = {key: plan}  # one epoch at a time; the previous one is done
        return plan

    def __call__(self, info) -> tuple[list[np.ndarray], ...]:
        """DALI batch-mode callback: the batch `info.iteration` of epoch `epoch_offset + epoch_idx`."""
        exit_with_parent()
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
        lo, mul = self.norm[stack]
        side = (lo, mul, np.array(self.index.label[row], np.float32), np.array(stack, np.int64),
                start.astype(np.int64))
        if not self.raw_lz4:
            patch = finished_patch(store_chunks.decode(region), region, start, self.index.size, flips)
            if self.patch_dtype is not None and patch.dtype != self.patch_dtype:
                patch = patch.astype(self.patch_dtype)
            return patch, *side
        groups = [a for part in split_chunks(region.offsets, region.sizes, self.inflate_groups) for a in part]
        dims7 = store_chunks.reassemble_dims(region.grid, region.chunk_zyx)
        anchor = [0, *(s - o for s, o in zip(start, region.origin_zyx))]
        return (region.data, *groups, np.asarray(region.chunk_zyx, np.int32), np.asarray(dims7, np.int32),
                np.asarray(region.region_shape, np.int32), np.asarray(anchor, np.int32), flips, *side)


def finished_patch(chunks: np.ndarray, region: store_chunks.ChunkRegion, start, size, flips) -> np.ndarray:
    """The contiguous (C, D, H, W) patch at `start` from a region's decoded chunks, flipped as asked.

    A flip along an axis reverses both the chunk order and the order inside each chunk along it, so
    it costs nothing on top of the reassembly copy; the crop origin is mirrored to match. Both copies
    land in recycled buffers (stores.chunks.POOL): fresh pages cost more than the copy on some VMs.
    """
    c, gz, gy, gx = region.grid
    cz, cy, cx = region.chunk_zyx
    tiles = chunks.reshape(c, gz, gy, gx, cz, cy, cx)
    reverse = [slice(None)] * 7
    for axis, flipped in enumerate(flips):
        if flipped:
            reverse[1 + axis] = reverse[4 + axis] = slice(None, None, -1)
    vox = pooled(region.region_shape, chunks.dtype)
    np.copyto(vox.reshape(c, gz, cz, gy, cy, gx, cx), tiles[tuple(reverse)].transpose(store_chunks.REASSEMBLE_PERM))
    crop = [slice(None)]
    for axis, (s, n, o, extent) in enumerate(zip(start, size, region.origin_zyx, region.region_shape[1:])):
        a = int(s) - o
        a = extent - a - n if flips[axis] else a
        crop.append(slice(a, a + n))
    if all(sl.stop - sl.start == extent for sl, extent in zip(crop[1:], region.region_shape[1:])):
        return vox  # the region is the patch (a patch-aligned box)
    patch = pooled((c, *size), chunks.dtype)
    np.copyto(patch, vox[tuple(crop)])
    return patch

