"""The checks that tell a damaged shard file from a sound one, shared by the reader (stores/chunks.py,
on every shard it opens and chunk it decodes) and `stacktrain verify` (stores/verify.py).

A shard file is sound when it agrees with the stack's completeness record (StackMeta.record: present,
listed, of the recorded size), its index's crc32c is right, and the chunks its index lists fill its data
bytes back to back (as the writer, stores/shards.py, and zarr-python store them); a chunk is sound when
it announces the decoded size a chunk has and decodes to it.
"""

from __future__ import annotations

import google_crc32c
import numpy as np

from stacktrain.errors import StoreDamaged

ABSENT = 2**64 - 1  # index entry of a chunk not stored (all fill value)


def damaged(stack_id: str, path, what: str) -> StoreDamaged:
    """The one line for a damaged stack: which stack, which file, what, and what to do."""
    return StoreDamaged(f"stack {stack_id!r}: {path}: {what}; the store is damaged: run `stacktrain verify` on it "
                      "and reconvert this stack (`stacktrain convert` redoes incomplete stacks)")


def index_problem(tail: bytes, file_size: int, n_inner: int) -> tuple[np.ndarray | None, str | None]:
    """The shard index from the file's last 16 * n_inner + 4 bytes, or why it cannot be trusted: its
    crc32c does not match, a chunk it lists lies beyond the data bytes, or the chunks do not fill the
    data bytes back to back (the writer stores them so). Plain Python over ~100 entries: faster than numpy."""
    table, crc = tail[:-4], tail[-4:]
    if google_crc32c.value(table) != int.from_bytes(crc, "little"):
        return None, "shard index checksum (crc32c) does not match"
    index = np.frombuffer(table, dtype="<u8").reshape(n_inner, 2)
    absent = ABSENT
    entries = index.tolist()
    stored = sorted((o, n) for o, n in entries if o != absent)
    data_end = file_size - len(tail)
    if any(o + n > data_end for o, n in stored):
        return None, f"shard index lists chunks beyond the file's {data_end} data bytes"
    end = 0
    for o, n in stored:
        if o != end:
            break
        end = o + n
    if end != data_end or len(stored) + sum(n == absent for o, n in entries if o == absent) != n_inner:
        return None, f"shard index does not account for the file's {data_end} data bytes"
    return index, None


def record_problem(record: dict | None, rel: str, size: int | None) -> str | None:
    """How a shard file (size None: missing) disagrees with the stack's completeness record."""
    if record is None:
        return None
    listed = record["shards"].get(rel)
    if listed is None:
        return None if size is None else "shard file not in the stack's completeness record (extra file)"
    if size is None:
        return "shard file is missing (listed in the stack's completeness record)"
    if size != listed[0]:
        return f"shard file has {size} bytes, the completeness record says {listed[0]}"
    return None


def declared_size(codec: str, data) -> int | None:
    """The decoded size a stored chunk announces (numcodecs' LZ4 header, zstd's frame content size)."""
    if codec == "lz4":
        return int.from_bytes(bytes(data[:4]), "little") if len(data) >= 4 else -1
    if codec != "zstd":
        return None
    head = bytes(data[:18])
    if len(head) < 6 or head[:4] != b"\x28\xb5\x2f\xfd":
        return -1
    flags = head[4]
    fcs_flag, single = flags >> 6, (flags >> 5) & 1
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[flags & 3]  # window descriptor, dictionary id
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if width == 0 or len(head) < pos + width:
        return None  # size not in the frame header: the decoder's own check has to do
    size = int.from_bytes(head[pos:pos + width], "little")
    return size + 256 if width == 2 else size
