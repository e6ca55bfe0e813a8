"""`stacktrain export`: an LZ4 store copied to zstd reads the same through stacktrain and opens in
tensorstore, which cannot read the LZ4 original; a damaged store is not copied."""

from __future__ import annotations

import numpy as np
import pytest

from stacktrain.cli import main
from stacktrain.stores.layout import IMAGE
from stacktrain.stores.reader import Store
from stacktrain.stores.verify import verify_store

SAME = ("stack_id", "label", "group", "shape", "dtype", "source", "source_sha256", "spacing_zyx", "percentiles",
        "channel_sum", "channel_sumsq", "chunk_zyx", "shard_zyx")


def test_export_to_zstd_keeps_everything_but_the_codec(small_store, tmp_path, capsys):
    src, arrays = small_store
    out = tmp_path / "copy.zarr"
    assert main(["export", str(src), "--out", str(out)]) == 0
    assert f"{len(arrays)} stacks copied" in capsys.readouterr().out
    a, b = Store(src), Store(out)
    assert b.stack_ids == a.stack_ids
    for sid in a.stack_ids:
        assert (a.meta(sid).codec, b.meta(sid).codec) == ("lz4", "zstd")
        assert {k: getattr(b.meta(sid), k) for k in SAME} == {k: getattr(a.meta(sid), k) for k in SAME}
        np.testing.assert_array_equal(b.read(sid), a.read(sid))
        np.testing.assert_array_equal(b.stats(sid)["mean"], a.stats(sid)["mean"])
    assert all(check.ok for check in verify_store(out, deep=True))

    import tensorstore as ts
    sid = a.stack_ids[0]
    spec = lambda store: {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(store / sid / IMAGE / "0")}}
    np.testing.assert_array_equal(ts.open(spec(out), read=True).result().read().result(), a.read(sid))
    with pytest.raises(ValueError, match="lz4"):  # why export exists: the original is LZ4
        ts.open(spec(src), read=True).result()


@pytest.mark.parametrize("case", ["damaged", "not-empty", "same"])
def test_export_refusals_are_one_line_and_write_nothing(small_store, tmp_path, capsys, case):
    src, _ = small_store
    out = tmp_path / "copy.zarr"
    if case == "damaged":
        shard = next(p for p in (src / Store(src).stack_ids[0] / IMAGE / "0" / "c").rglob("*") if p.is_file())
        shard.write_bytes(shard.read_bytes()[:-1])
    elif case == "not-empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out = src
    assert main(["export", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    if case == "damaged":
        assert "damaged" in err and not out.exists()
    elif case == "not-empty":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
