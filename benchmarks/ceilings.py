"""The ceilings of `bench loader`, measured in the same run, on the same patches, with the same cores.

(a) ram:    numpy crop of the stacks already in RAM (one copy of each patch's bytes);
(b) bytes:  the stored bytes of the chunks covering each patch, read with one `preadv` per run of
            adjacent chunks into a reused buffer (the byte ranges are looked up before timing);
(c) decode: (b) plus decoding every chunk (LZ4: numcodecs' C decoder) into a reused buffer.
Plus the GPU mode's CPU side: the pipelines' own source in bytes-only mode (`raw_lz4=True`), called
batch by batch exactly as DALI's parallel workers call it.

Each runs in a pool of `cores` processes that build their state (open files, volumes) once;
a segment hands them every patch of one epoch in small tasks and waits for all.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import types
from pathlib import Path

import numpy as np

from stacktrain.pipelines.workers import start_method
from stacktrain.stores.chunks import ABSENT, chunk_decoder, region_grid
from stacktrain.stores.reader import Store

KINDS = ("ram", "bytes", "decode", "source-bytes")
TASKS_PER_CORE = 4  # enough tasks to balance the workers, few enough that messaging stays negligible


@dataclasses.dataclass(frozen=True)
class PatchBytes:
    """Where one patch's chunk bytes are: runs of adjacent chunks per shard file."""

    stack: int
    box: tuple[tuple[int, int], ...]
    runs: tuple[tuple[str, int, int], ...]  # (shard file, offset, length)
    chunks: tuple[tuple[int, int], ...]  # (position in the concatenated runs, stored size)

    @property
    def nbytes(self) -> int:
        return sum(length for _, _, length in self.runs)


def patch_bytes(store, stack_ids, stack: int, box) -> PatchBytes:
    """Look up the byte ranges of every stored chunk covering `box` (absent chunks have none)."""
    sid = stack_ids[stack]
    files = store._shards(sid)
    cz, cy, cx = files.chunk_shape[1:]
    ranges = region_grid(box, (cz, cy, cx))
    found = []  # (path, offset, nbytes)
    for c in range(files.shape[0]):
        for gz in range(*ranges[0]):
            for gy in range(*ranges[1]):
                for gx in range(*ranges[2]):
                    cidx = (c, gz, gy, gx)
                    if any(i < 0 or i >= g for i, g in zip(cidx, files.chunk_grid)):
                        continue
                    key = tuple(i // n for i, n in zip(cidx, files.inner))
                    fd, index = files._shard(key)
                    if fd is None:
                        continue
                    local = np.ravel_multi_index(tuple(i % n for i, n in zip(cidx, files.inner)), files.inner)
                    offset, nbytes = (int(v) for v in index[local])
                    if offset != int(ABSENT):
                        found.append((str(files.array_dir.joinpath("c", *map(str, key))), offset, nbytes))
    found.sort()
    runs, chunks, pos = [], [], 0
    for path, offset, nbytes in found:
        if runs and runs[-1][0] == path and runs[-1][1] + runs[-1][2] == offset:
            runs[-1] = (path, runs[-1][1], runs[-1][2] + nbytes)
        else:
            runs.append((path, offset, nbytes))
        chunks.append((pos, nbytes))
        pos += nbytes
    return PatchBytes(stack, tuple(box), tuple(runs), tuple(chunks))


# -- worker side: module-level state built once per worker process ----------------------------------
_STATE = types.SimpleNamespace()


def _init_worker(kind: str, store_path: str, stack_ids: list[str], patches, source) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    st = _STATE
    st.kind, st.patches, st.source, st.fds = kind, patches, source, {}
    store = Store(store_path)
    if kind == "ram":
        st.volumes = [store.read(sid) for sid in stack_ids]
        st.out = None
    elif kind in ("bytes", "decode"):
        meta = store.meta(stack_ids[0])
        st.chunk_nbytes = int(np.prod(meta.chunk_zyx)) * np.dtype(meta.dtype).itemsize
        st.codec = meta.codec
        st.buf = np.empty(max(p.nbytes for p in patches) or 1, np.uint8)
        st.decoded = np.empty((max(len(p.chunks) for p in patches) or 1, st.chunk_nbytes), np.uint8)


def _fd(path: str) -> int:
    fd = _STATE.fds.get(path)
    if fd is None:
        fd = _STATE.fds[path] = os.open(path, os.O_RDONLY)
    return fd


def _read(p: PatchBytes) -> memoryview:
    view = memoryview(_STATE.buf)
    pos = 0
    for path, offset, length in p.runs:
        os.preadv(_fd(path), [view[pos:pos + length]], offset)
        pos += length
    return view


def _work(task) -> int:
    """Process one task (a list of patch numbers, or a batch of the source) and return patches done."""
    st = _STATE
    if st.kind == "source-bytes":
        epoch, iteration = task
        columns = st.source(types.SimpleNamespace(epoch_idx=epoch, iteration=iteration))
        return len(columns[0])
    for i in task:
        p = st.patches[i]
        if st.kind == "ram":
            (z0, z1), (y0, y1), (x0, x1) = p.box
            crop = st.volumes[p.stack][:, z0:z1, y0:y1, x0:x1]
            if st.out is None or st.out.shape != crop.shape:
                st.out = np.empty_like(crop)
            np.copyto(st.out, crop)
        elif st.kind == "bytes":
            _read(p)
        else:
            view, decompress = _read(p), chunk_decoder(st.codec)
            for k, (pos, size) in enumerate(p.chunks):
                decompress(view[pos:pos + size], st.decoded[k])
    return len(task)


class CeilingPool:
    """`cores` spawned workers running one kind of work; `run(tasks)` returns patches processed."""

    def __init__(self, kind: str, *, cores: int, store_path: Path, stack_ids: list[str], patches=(),
                 source=None):
        if kind not in KINDS:
            raise ValueError(f"unknown ceiling {kind!r}; one of {KINDS}")
        ctx = multiprocessing.get_context(start_method())
        self.pool = ctx.Pool(cores, initializer=_init_worker,
                             initargs=(kind, str(store_path), list(stack_ids), list(patches), source))

    def run(self, tasks) -> int:
        return sum(self.pool.imap_unordered(_work, tasks))

    def close(self) -> None:
        self.pool.close()
        self.pool.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.terminate()
        self.pool.join()


def patch_tasks(numbers: list[int], cores: int) -> list[list[int]]:
    """The patches of one segment cut into about TASKS_PER_CORE tasks per worker."""
    n_tasks = max(1, min(len(numbers), cores * TASKS_PER_CORE))
    return [part.tolist() for part in np.array_split(np.asarray(numbers, np.int64), n_tasks) if len(part)]
