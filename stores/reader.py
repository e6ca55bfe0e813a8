"""Open a store, list its stacks, read regions, and hand out compressed chunk bytes for the GPU."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from stacktrain.errors import StoreError

from . import chunks as _chunks
from .layout import FORMAT_VERSION, GPU_CODECS, IMAGE, LEVEL0, STATS, StackMeta, check_stack_id

MAX_OPEN_STACKS = 32
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # ((z0, z1), (y0, y1), (x0, x1))


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path.parent}: not a stacktrain store ({what} missing); "
                         "create one with `stacktrain convert`") from None
    except json.JSONDecodeError as e:
        raise StoreError(f"{path}: corrupt metadata ({e}); reconvert the store") from None


def read_stack_meta(store: Path, stack_id: str) -> StackMeta:
    """A stack's StackMeta from `<stack_id>/zarr.json`, or one StoreError: missing, not JSON, not a
    stacktrain stack, naming another stack, or of a format_version this stacktrain does not read."""
    path = Path(store) / stack_id / "zarr.json"
    try:
        attrs = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"stack {stack_id!r}: {path} is missing; the store is damaged: reconvert this stack "
                         f"(`stacktrain convert` redoes incomplete stacks), or drop it from the list with "
                         f"`stacktrain remove {store} {stack_id}`") from None
    except ValueError as e:
        raise StoreError(f"stack {stack_id!r}: {path}: corrupt metadata ({e}); the store is damaged: "
                         "reconvert this stack") from None
    def not_a_stack(e: Exception) -> StoreError:
        return StoreError(f"stack {stack_id!r}: {path}: not a stacktrain stack's metadata ({type(e).__name__}: "
                          f"{e}); the store is damaged: reconvert this stack")

    try:
        d = attrs["attributes"]["stacktrain"]
        version = d.get("format_version")
    except (KeyError, TypeError, AttributeError) as e:
        raise not_a_stack(e) from None
    if version != FORMAT_VERSION:
        raise StoreError(f"stack {stack_id!r}: {path}: format_version {version!r} is not supported by this "
                         f"stacktrain (reads {FORMAT_VERSION}); reconvert the stack with this version")
    try:
        meta = StackMeta.from_dict(d)
    except (TypeError, ValueError) as e:
        raise not_a_stack(e) from None
    if meta.stack_id != stack_id:
        raise StoreError(f"{path}: names stack {meta.stack_id!r}, but the store "
                         f"lists it as {stack_id!r}; the store's metadata is damaged")
    return meta


def array_problem(array_dir: Path, meta: StackMeta) -> str | None:
    """How the array's own zarr.json (`array_dir`/zarr.json) disagrees with the stack's metadata, or
    that it is missing; None when it agrees."""
    path = array_dir / "zarr.json"
    try:
        arr = json.loads(path.read_text())
        shape, dtype = tuple(arr["shape"]), arr["data_type"]
        outer = tuple(arr["chunk_grid"]["configuration"]["chunk_shape"])
    except FileNotFoundError:
        return "the array's zarr.json is missing"
    except (ValueError, KeyError, TypeError) as e:
        return f"not a Zarr array's metadata ({type(e).__name__}: {e})"
    if shape != tuple(meta.shape) or dtype != meta.dtype or outer != (meta.shape[0], *meta.shard_zyx):
        return (f"says shape {shape}, {dtype}, shards {outer}; the stack's metadata says "
                f"{tuple(meta.shape)}, {meta.dtype}, shards {(meta.shape[0], *meta.shard_zyx)}")
    return None


class Store:
    """A read-only view of a stacktrain store. Picklable: worker processes reopen files lazily."""

    def __init__(self, path: str | Path, *, damaged_ok: bool = False):
        """`damaged_ok`: a listed stack whose metadata cannot be read (a folder deleted by hand) is kept
        out of `stacks` and named in `damaged` (stack id -> why) instead of refusing the store."""
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreError(f"{self.path}: store not found; create it with `stacktrain convert`")
        root = _read_json(self.path / "zarr.json", "zarr.json")
        info = root.get("attributes", {}).get("stacktrain")
        if info is None:
            raise StoreError(f"{self.path}: a Zarr group but not a stacktrain store "
                             "(no attributes.stacktrain); create it with `stacktrain convert`")
        version = info.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"{self.path}: format_version {version!r} is not supported by this "
                             f"stacktrain (reads {FORMAT_VERSION}); reconvert with this version")
        self._metas: dict[str, StackMeta] = {}
        self.damaged: dict[str, str] = {}
        for entry in info.get("stacks", []):
            sid = entry.get("stack_id") if isinstance(entry, dict) else None
            if why := check_stack_id(sid):  # a crafted root list must not name paths outside the store
                raise StoreError(f"{self.path}/zarr.json: {why}; this store's stack list is damaged")
            try:
                self._metas[sid] = read_stack_meta(self.path, sid)
            except StoreError as e:
                if not damaged_ok:
                    raise
                self.damaged[sid] = str(e)
        self._files: OrderedDict[str, _chunks.ShardFiles] = OrderedDict()  # least recently used first

    # -- listing -------------------------------------------------------------------------------
    @property
    def stack_ids(self) -> list[str]:
        return list(self._metas)

    @property
    def stacks(self) -> list[StackMeta]:
        return list(self._metas.values())

    def meta(self, stack_id: str) -> StackMeta:
        try:
            return self._metas[stack_id]
        except KeyError:
            raise StoreError(f"{self.path}: no stack {stack_id!r}; it has {len(self._metas)} stacks "
                             f"(e.g. {', '.join(list(self._metas)[:5])})") from None

    def array_path(self, stack_id: str) -> Path:
        return self.path / stack_id / IMAGE / LEVEL0

    def zarr_array(self, stack_id: str):
        """The level-0 array through zarr-python (the portable, slower path)."""
        import zarr
        self.meta(stack_id)
        return zarr.open_array(self.array_path(stack_id), mode="r")

    def stats(self, stack_id: str) -> dict[str, np.ndarray]:
        """Per stats-cell `foreground` (Zc, Yc, Xc) and `mean` (C, Zc, Yc, Xc) written at conversion."""
        import zarr
        self.meta(stack_id)
        group = zarr.open_group(self.path / stack_id / STATS, mode="r")
        return {name: np.asarray(group[name][...]) for name in ("foreground", "mean")}

    # -- chunks --------------------------------------------------------------------------------
    def _shards(self, stack_id: str) -> _chunks.ShardFiles:
        files = self._files.get(stack_id)
        if files is not None:
            self._files.move_to_end(stack_id)
        else:
            if len(self._files) >= MAX_OPEN_STACKS:  # bound open files: at most 32 x 16 shards
                self._files.popitem(last=False)[1].close()
            m = self.meta(stack_id)
            if problem := array_problem(self.array_path(stack_id), m):  # once per stack a process opens
                raise _chunks.damaged(stack_id, self.array_path(stack_id) / "zarr.json", problem)
            c = m.shape[0]
            files = _chunks.ShardFiles(self.array_path(stack_id), m.shape, (1, *m.chunk_zyx),
                                       (c, *m.shard_zyx), np.dtype(m.dtype).itemsize, stack_id=stack_id,
                                       record=m.record)
            self._files[stack_id] = files
        return files

    def chunk_region(self, stack_id: str, box: Box, *, raw_lz4: bool = False) -> _chunks.ChunkRegion:
        """Stored bytes of every chunk covering `box`, with per-chunk offsets and sizes.

        With `raw_lz4=True` each chunk is a raw LZ4 block, ready for DALI's `fn.decoders.inflate`;
        a store whose codec the GPU cannot inflate is refused with what to do instead.
        """
        m = self.meta(stack_id)
        if raw_lz4 and m.codec not in GPU_CODECS:
            raise StoreError(
                f"{self.path}: stack {stack_id!r} uses the {m.codec} codec, which the GPU cannot "
                f"decode (DALI inflates LZ4 only); reconvert with `stacktrain convert --codec lz4` "
                f"or use the CPU loader (loader = \"dali-cpu\" or \"torch\")")
        return _chunks.gather(self._shards(stack_id), box, codec=m.codec, dtype=m.dtype, raw_lz4=raw_lz4)

    def read(self, stack_id: str, box: Box | None = None) -> np.ndarray:
        """The (C, z, y, x) voxels of `box` (whole stack when None); outside the stack reads as 0."""
        m = self.meta(stack_id)
        if box is None:
            box = tuple((0, n) for n in m.shape[1:])
        region = self.chunk_region(stack_id, box)
        vox = _chunks.reassemble(_chunks.decode(region), region.grid)
        sl = tuple(slice(lo - o, hi - o) for (lo, hi), o in zip(box, region.origin_zyx))
        return np.ascontiguousarray(vox[(slice(None), *sl)])

    def close(self) -> None:
        for files in self._files.values():
            files.close()
        self._files.clear()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()
        return state


def open_store(path: str | Path) -> Store:
    return Store(path)
