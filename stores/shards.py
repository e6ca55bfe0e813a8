"""Shard files of a Zarr v3 array written straight from slabs: the same bytes zarr-python writes.

zarr-python spends 120-180 us of CPU per chunk on its way through the codec pipeline (README,
"Choosing chunks"); a 3x64x1024x1024 stack has 3,072 chunks, so `convert` assembles the shard files
itself, as zarr's sharding codec lays them out (`zarr.codecs.sharding`):
- inner chunks in zarr's Morton order (`zarr.core.indexing.morton_order_iter`), each one encoded by
  the same numcodecs codec zarr wraps (`numcodecs.LZ4`, `numcodecs.Zstd`), concatenated;
- chunks whose voxels all equal the fill value (0) are not stored (zarr's `write_empty_chunks=False`):
  their index entry is (2**64-1, 2**64-1); a shard with no stored chunk is not written at all;
- edge chunks are padded with the fill value to the full chunk shape;
- at the end, the index: (offset, nbytes) as little-endian uint64 per inner chunk in C order, and the
  crc32c of the index (google_crc32c, what zarr's `Crc32cCodec` uses), little-endian uint32.
The array's zarr.json is written by zarr-python (`create_array`); tests/stores/test_shards.py checks
the files byte for byte against zarr-python's own for both codecs, edges and empty chunks included.
Each chunk is copied once, into a reused buffer, and encoded from there; the encoded parts go to the
file with one vectored write.
While writing, each shard's byte size, the crc32c of its bytes and the crc32c of its content (each
stored chunk's index position and its buffer just encoded, in file order) go into `files`, the stack's
completeness record: computed from bytes already in cache, so the checksums cost no second pass.
"""

from __future__ import annotations

from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
from zarr.core.indexing import morton_order_iter

from .layout import shard_relpath

ABSENT = 2**64 - 1
ZSTD_LEVEL = 3  # the writer's ZstdCodec(level=3)


def chunk_encoder(codec: str):
    """bytes-like -> bytes, the numcodecs codec behind zarr's LZ4 / ZstdCodec(level=3) of the store."""
    if codec == "lz4":
        return numcodecs.LZ4().encode
    if codec == "zstd":
        return numcodecs.Zstd(level=ZSTD_LEVEL, checksum=False).encode
    raise ValueError(f"unknown codec {codec!r}")


class ShardWriter:
    """Writes the shards of one (C, Z, Y, X) array from slabs that start on a shard boundary in z and
    span whole shards in z (the last may end with the array). Shards hold all C channels."""

    def __init__(self, array_dir: Path, shape, dtype, *, codec: str, chunk_zyx, shard_zyx):
        self.array_dir = Path(array_dir)
        self.shape = tuple(shape)
        self.chunk = tuple(chunk_zyx)
        self.shard = tuple(shard_zyx)
        c = self.shape[0]
        self.inner = (c, *(s // k for s, k in zip(self.shard, self.chunk)))
        # zarr's order of the chunks inside a shard, with each chunk's position in the C-order index
        self.order = [(key, int(np.ravel_multi_index(key, self.inner))) for key in morton_order_iter(self.inner)]
        self.encode = chunk_encoder(codec)
        self.buf = np.empty(self.chunk, dtype)  # reused for every chunk
        self.index = np.empty((int(np.prod(self.inner)), 2), "<u8")
        self.shards_written = 0
        self.bytes_written = 0
        self.files: dict[str, list[int]] = {}  # "c/0/z/y/x" -> [size, file crc32c, content crc32c]

    def write_slab(self, z0: int, slab: np.ndarray) -> None:
        sz = self.shard[0]
        if z0 % sz:
            raise ValueError(f"slab at z={z0} does not start on a shard boundary ({sz})")
        _, dz, y, x = slab.shape
        for lz in range(0, dz, sz):
            for y0 in range(0, y, self.shard[1]):
                for x0 in range(0, x, self.shard[2]):
                    self._write_shard(slab, lz, y0, x0, (z0 + lz) // sz)

    def _write_shard(self, slab: np.ndarray, lz: int, y0: int, x0: int, gz: int) -> None:
        _, dz, y, x = slab.shape
        kz, ky, kx = self.chunk
        buf, index = self.buf, self.index
        index.fill(ABSENT)
        parts: list[bytes] = []
        offset = content = 0
        for (c, iz, iy, ix), position in self.order:
            z1, y1, x1 = lz + iz * kz, y0 + iy * ky, x0 + ix * kx
            if z1 >= dz or y1 >= y or x1 >= x:
                continue  # beyond the array: all fill
            view = slab[c, z1:z1 + kz, y1:y1 + ky, x1:x1 + kx]
            if view.shape != self.chunk:
                buf.fill(0)
                buf[:view.shape[0], :view.shape[1], :view.shape[2]] = view
            else:
                np.copyto(buf, view)
            if not buf.any():
                continue  # equal to the fill value: not stored
            # each chunk's index position goes in too: the content checksum also sees chunks swapped in
            # the index (a file checksum cannot: crc(index + crc(index)) is the same for every index)
            content = google_crc32c.extend(content, position.to_bytes(4, "little"))
            content = google_crc32c.extend(content, buf)
            data = self.encode(buf)
            parts.append(data)
            index[position] = (offset, len(data))
            offset += len(data)
        if not parts:
            return
        table = index.tobytes()
        parts += [table, google_crc32c.value(table).to_bytes(4, "little")]
        rel = shard_relpath(gz, y0 // self.shard[1], x0 // self.shard[2])
        path = self.array_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        file_crc = 0
        for part in parts:
            file_crc = google_crc32c.extend(file_crc, part)
        with open(path, "wb") as f:
            f.writelines(parts)
        size = offset + len(table) + 4
        self.files[rel] = [size, file_crc, content]
        self.shards_written += 1
        self.bytes_written += size
