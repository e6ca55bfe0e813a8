"""Damaged stores: every corruption is refused by the reader with one line naming the stack and the
file, found by `verify` (`--deep` for damage only the content checksums see), and refused by `train`.

Levels: "quick" damage is seen by the reader when it opens the shard or the stack, by the quick check
and by train's refusal; "open" damage stops the store from opening; "decode" damage is seen when the
chunk is decoded (reader) and by `verify --deep`; "content" damage decodes to other voxels of the right
size, and only the content checksums of `verify --deep` see it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from stacktrain.errors import StoreError
from stacktrain.stores.reader import Store
from stacktrain.stores.verify import check_stack, require_intact
from stacktrain.testing import tissue, write_store

SHAPE = (3, 24, 48, 48)
CHUNK, SHARD = (8, 16, 16), (16, 32, 32)  # 2x2x2 shards of 3x2x2x2 = 24 chunks
N_INNER = 24
FIRST = "c/0/0/0/0"
EMPTY = "c/0/1/1/1"  # all zeros: never written


def _arrays() -> dict[str, tuple[np.ndarray, str, str]]:
    a = tissue(SHAPE, seed=3, empty_corner=False)
    a[:, 16:, 32:, 32:] = 0
    return {"s0": (a, "SAIN", "p0"), "s1": (tissue(SHAPE, seed=4), "MALADE", "p1")}


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {codec: write_store(root / f"{codec}.zarr", _arrays(), codec=codec, chunk_zyx=CHUNK, shard_zyx=SHARD)
            for codec in ("lz4", "zstd")}


# -- how to damage a stack ---------------------------------------------------------------------------
def _shard(store: Path, rel: str = FIRST) -> Path:
    return store / "s0" / "image" / "0" / rel


def _index(store: Path) -> tuple[bytearray, np.ndarray]:
    data = bytearray(_shard(store).read_bytes())
    return data, np.frombuffer(bytes(data[-(16 * N_INNER + 4):-4]), "<u8").reshape(N_INNER, 2).copy()


def _put_index(store: Path, data: bytearray, index: np.ndarray, fix_crc: bool = True) -> None:
    table = index.astype("<u8").tobytes()
    crc = google_crc32c.value(table).to_bytes(4, "little") if fix_crc else bytes(data[-4:])
    data[-(16 * N_INNER + 4):] = table + crc
    _shard(store).write_bytes(bytes(data))


def _first_chunk(index: np.ndarray) -> tuple[int, int, int]:
    """(index position, offset, size) of the chunk stored first in the file."""
    pos = int(np.argmin(np.where(index[:, 0] == 2**64 - 1, np.inf, index[:, 0].astype(float))))
    return pos, int(index[pos, 0]), int(index[pos, 1])


def _edit_bytes(edit: Callable[[bytearray, np.ndarray], None]):
    def damage(store):
        data, index = _index(store)
        edit(data, index)
        _shard(store).write_bytes(bytes(data))
    return damage


def _edit_index(edit: Callable[[np.ndarray], None], fix_crc: bool = True):
    def damage(store):
        data, index = _index(store)
        edit(index)
        _put_index(store, data, index, fix_crc)
    return damage


def _edit_json(rel: str, edit: Callable[[dict], None]):
    def damage(store):
        path = store / "s0" / rel
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))
    return damage


def _meta(edit: Callable[[dict], None]):
    return _edit_json("zarr.json", lambda d: edit(d["attributes"]["stacktrain"]))


def _flip_last_literal(data, index):
    _, off, size = _first_chunk(index)
    data[off + size - 1] ^= 0x01  # LZ4 ends every block with literals: still decodes, one voxel differs


def _flip_200(data, index):
    _, off, _ = _first_chunk(index)
    data[off + 8:off + 208] = bytes(b ^ 0xFF for b in data[off + 8:off + 208])


def _lz4_header(data, index):
    _, off, _ = _first_chunk(index)
    data[off:off + 4] = (2047).to_bytes(4, "little")


def _flip_index_byte(data, index):
    data[-(16 * N_INNER + 4) + 3] ^= 0x10


def _index_ff(index):
    index[:] = 2**64 - 1


def _offset_beyond(index):
    pos, _, _ = _first_chunk(index)
    index[pos, 0] = 10**9


def _shrink_chunk(index):
    pos, _, _ = _first_chunk(index)
    index[pos, 1] -= 1


def _swap_chunks(index):
    stored = np.flatnonzero(index[:, 0] != 2**64 - 1)
    index[[stored[0], stored[1]]] = index[[stored[1], stored[0]]]


def _truncate(keep: Callable[[int], int]):
    def damage(store):
        path = _shard(store)
        data = path.read_bytes()
        path.write_bytes(data[:keep(len(data))])
    return damage


def _append(store):
    with _shard(store).open("ab") as f:
        f.write(b"\0" * 64)


def _delete(rel: str):
    return lambda store: (store / "s0" / rel).unlink()


def _extra_shard(store):
    shutil.copy(_shard(store), _shard(store, EMPTY))


def _garble(rel: str):
    def damage(store):
        path = store / "s0" / rel
        path.write_text(path.read_text()[:40])
    return damage


def _big_shape(d):
    d["shape"] = [3, 320, 960, 960]


def _record_size(m):
    m["record"]["shards"][FIRST][0] += 1


@dataclasses.dataclass(frozen=True)
class Fault:
    id: str
    damage: Callable[[Path], None]
    level: str  # quick | open | decode | content
    says: str  # in the reader's line (quick, open, decode)
    codecs: tuple[str, ...] = ("lz4", "zstd")


FAULTS = [
    Fault("bit-flipped-in-chunk-literal", _edit_bytes(_flip_last_literal), "content", "", ("lz4",)),
    Fault("200-bytes-flipped-in-chunk", _edit_bytes(_flip_200), "decode", "does not decode"),
    Fault("lz4-size-header-wrong", _edit_bytes(_lz4_header), "decode", "announces 2047", ("lz4",)),
    Fault("two-chunks-swapped-in-index", _edit_index(_swap_chunks), "content", ""),
    Fault("byte-flipped-in-index", _edit_bytes(_flip_index_byte), "quick", "checksum"),
    Fault("index-crc-flipped", _edit_bytes(lambda d, i: d.__setitem__(-1, d[-1] ^ 0x80)), "quick", "checksum"),
    Fault("index-all-0xff", _edit_index(_index_ff, fix_crc=False), "quick", "checksum"),
    Fault("index-all-0xff-crc-fixed", _edit_index(_index_ff), "quick", "does not account"),
    Fault("chunk-offset-beyond-file", _edit_index(_offset_beyond), "quick", "beyond the file"),
    Fault("chunk-size-shrunk-in-index", _edit_index(_shrink_chunk), "quick", "does not account"),
    Fault("truncated-by-1-byte", _truncate(lambda n: n - 1), "quick", "completeness record says"),
    Fault("truncated-to-half", _truncate(lambda n: n // 2), "quick", "completeness record says"),
    Fault("truncated-to-0", _truncate(lambda n: 0), "quick", "completeness record says"),
    Fault("bytes-appended", _append, "quick", "completeness record says"),
    Fault("shard-deleted", _delete(f"image/0/{FIRST}"), "quick", "missing"),
    Fault("extra-shard", _extra_shard, "quick", "extra file"),
    Fault("record-size-wrong", _meta(_record_size), "quick", "completeness record says", ("lz4",)),
    Fault("array-zarr-json-deleted", _delete("image/0/zarr.json"), "quick", "zarr.json is missing", ("lz4",)),
    Fault("array-zarr-json-garbled", _garble("image/0/zarr.json"), "quick", "not a Zarr array", ("lz4",)),
    Fault("shape-claims-3x320x960x960", _meta(_big_shape), "quick", "shards", ("lz4",)),
    Fault("shape-claims-3x320x960x960-in-both", lambda s: (_meta(_big_shape)(s), _edit_json(
        "image/0/zarr.json", _big_shape)(s)), "quick", "were written", ("lz4",)),
    Fault("shape-claims-more-slices-same-grid", _meta(lambda m: m.__setitem__("shape", [3, 30, 48, 48])),
          "quick", "says shape", ("lz4",)),
    Fault("dtype-claims-uint16", _meta(lambda m: m.__setitem__("dtype", "uint16")), "quick", "uint16", ("lz4",)),
    Fault("format-version-99", _meta(lambda m: m.__setitem__("format_version", 99)), "open", "format_version 99",
          ("lz4",)),
    Fault("stack-zarr-json-garbled", _garble("zarr.json"), "open", "corrupt metadata", ("lz4",)),
    Fault("stack-zarr-json-not-a-stack", _edit_json("zarr.json", lambda d: d.pop("attributes")), "open",
          "not a stacktrain stack", ("lz4",)),
    Fault("stack-zarr-json-deleted", _delete("zarr.json"), "open", "zarr.json is missing", ("lz4",)),
]
CASES = [pytest.param((f, codec), id=f"{codec}-{f.id}") for f in FAULTS for codec in f.codecs]


@pytest.fixture
def damaged(request, templates, tmp_path):
    fault, codec = request.param
    store = tmp_path / "s.zarr"
    shutil.copytree(templates[codec], store)
    fault.damage(store)
    return fault, codec, store


def _one_line_naming_s0(error: StoreError, fault: Fault) -> None:
    text = str(error)
    assert "\n" not in text and "'s0'" in text and fault.says in text, text
    assert "s0/" in text or "s0 " in text or "'s0'" in text


@pytest.mark.parametrize("damaged", CASES, indirect=True)
def test_the_reader_refuses_it(damaged):
    fault, codec, store = damaged
    original = _arrays()["s0"][0]
    if fault.level == "open":
        with pytest.raises(StoreError) as e:
            Store(store)
        _one_line_naming_s0(e.value, fault)
        assert "zarr.json" in str(e.value)
        return
    st = Store(store)
    np.testing.assert_array_equal(st.read("s1"), _arrays()["s1"][0])  # the other stack reads as before
    if fault.level == "content":  # decodes to the right size: only `verify --deep` can tell
        assert not np.array_equal(st.read("s0"), original)
        return
    with pytest.raises(StoreError) as e:
        st.read("s0")
    _one_line_naming_s0(e.value, fault)
    assert "zarr.json" in str(e.value) or "/c/0/" in str(e.value)  # the file at fault
    assert "stacktrain verify" in str(e.value)
    if fault.level == "quick" or fault.id == "lz4-size-header-wrong":  # what the GPU loader gathers, too
        with pytest.raises(StoreError, match="'s0'"):
            Store(store).chunk_region("s0", ((0, 24), (0, 48), (0, 48)), raw_lz4=codec == "lz4")


@pytest.mark.parametrize("damaged", CASES, indirect=True)
def test_verify_finds_it_and_train_refuses_it(damaged):
    fault, _, store = damaged
    quick, deep = check_stack(store, "s0"), check_stack(store, "s0", deep=True)
    assert check_stack(store, "s1", deep=True).ok
    assert not deep.ok
    if fault.level in ("decode", "content"):
        assert quick.ok  # the quick check reads no chunk
        assert "checksum" in deep.problems[0] or "does not decode" in deep.problems[0], deep.problems
        return
    assert not quick.ok and all("\n" not in p for p in quick.problems)
    with pytest.raises(StoreError) as e:  # what train/data.py open_data and predict do before any step
        require_intact(Store(store), ["s1", "s0"])
    assert "\n" not in str(e.value) and "'s0'" in str(e.value)
    if fault.level == "quick":
        assert "stacktrain verify" in str(e.value)


# -- `stacktrain train` on a damaged store -------------------------------------------------------------
@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """8 stacks of 16x64x64 (4 patches each) and a patient split: the tiny training setup, without raw files."""
    from stacktrain.train.split import make_splits, write_split

    root = tmp_path_factory.mktemp("train")
    store = write_store(root / "store.zarr", {f"t{i}": (tissue((3, 16, 64, 64), seed=i), ("SAIN", "MALADE")[i % 2],
                                                        f"p{i // 2}") for i in range(8)})
    write_split(make_splits(store, val_fraction=0.3, seed=0), root / "splits.json")
    first = json.loads((root / "splits.json").read_text())["folds"][0]["train"][0]
    return store, root / "splits.json", first


def _train_line(capsys, store, splits, tmp_path, *overrides) -> str:
    from stacktrain.cli import main
    from stacktrain.train.config import save_config
    from tests.support import tiny_config

    cfg = tmp_path / "cfg.toml"
    save_config(tiny_config(store, splits, "train.epochs=1", *overrides), cfg)
    assert main(["train", str(cfg), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err  # the run's own status lines aside
    return errors[0]


@pytest.mark.parametrize(("fault", "loader"), [
    pytest.param("shard-deleted", "loader.workers=0", id="shard-deleted"),
    pytest.param("200-bytes-flipped-in-chunk", "loader.workers=0", id="200-bytes-flipped-in-process"),
    pytest.param("200-bytes-flipped-in-chunk", "loader.workers=1", id="200-bytes-flipped-in-a-dali-worker")])
def test_train_stops_with_one_line(train_data, tmp_path, capsys, fault, loader):
    store, splits, sid = train_data
    copy = tmp_path / "store.zarr"
    shutil.copytree(store, copy)
    shard = copy / sid / "image" / "0" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    if fault == "shard-deleted":
        shard.unlink()
        says = "is damaged"  # refused by the quick check, before the model is built
    else:
        data[100:300] = bytes(b ^ 0xFF for b in data[100:300])
        shard.write_bytes(bytes(data))
        says = "does not decode"  # the quick check reads no chunk: the first batch that holds it stops the run
    err = _train_line(capsys, copy, splits, tmp_path, loader)
    assert f"'{sid}'" in err and says in err and "stacktrain verify" in err, err
