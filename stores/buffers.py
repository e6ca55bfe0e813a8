"""Recycled large buffers for regions and decoded chunks (stores/chunks.py, pipelines/source.py)."""

from __future__ import annotations

import sys
import threading

import numpy as np


class BufferPool:
    """Large uint8 buffers recycled once nothing references them any more.

    A fresh multi-megabyte array costs a page fault per 4 KiB page when first written; on virtual
    machines that is ~3 us a page, more than reading the patch's bytes (benchmarks/results). A pooled
    buffer is handed out again only when its reference count shows that no array, view, memoryview or
    tensor still uses it (CPython reference counting is exact), so a consumer that keeps a region, a
    DALI worker still serializing a batch, or a torch tensor sharing the memory is never overwritten.
    """

    SMALL = 1 << 20  # below this, plain allocation is cheap enough

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self._buffers: list[np.ndarray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> np.ndarray:
        """A 1-D uint8 array of `nbytes` (contents undefined)."""
        if nbytes < self.SMALL:
            return np.empty(nbytes, np.uint8)
        with self._lock:
            bufs = self._buffers
            for i in range(len(bufs)):
                # 2 references when free: the pool's list and getrefcount's own argument
                if bufs[i].nbytes >= nbytes and sys.getrefcount(bufs[i]) == 2:
                    return bufs[i][:nbytes]
            total = sum(b.nbytes for b in bufs)
            buf = np.empty(nbytes, np.uint8)
            if total + nbytes <= self.max_bytes:
                bufs.append(buf)
            elif bufs:  # full: replace a free buffer that is too small, if any
                for i in range(len(bufs)):
                    if sys.getrefcount(bufs[i]) == 2 and total - bufs[i].nbytes + nbytes <= self.max_bytes:
                        bufs[i] = buf
                        break
            return buf


    def clear(self) -> None:
        """Forget every buffer (those still in use live on with their users): after a large job."""
        with self._lock:
            self._buffers = []


POOL = BufferPool()


def pooled(shape, dtype) -> np.ndarray:
    """An array of `shape` and `dtype` (contents undefined) on a recycled buffer of POOL."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return POOL.take(n).view(dtype).reshape(shape)
