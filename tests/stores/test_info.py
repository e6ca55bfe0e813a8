"""`stacktrain info`: the table's rows and totals, --json against the store, unknown format refused."""

from __future__ import annotations

import json
import math

import pytest

from stacktrain.cli import main
from stacktrain.stores.info import summarize
from stacktrain.stores.reader import Store


@pytest.fixture
def info_store(small_store):
    """conftest's four stacks: s0, s2 SAIN; s1, s3 MALADE; groups p0, p1."""
    return small_store[0]


def test_json_matches_the_store(info_store, capsys):
    assert main(["info", str(info_store), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    store = Store(info_store)
    assert [s["stack_id"] for s in out["stacks"]] == store.stack_ids
    for row in out["stacks"]:
        m = store.meta(row["stack_id"])
        assert (row["label"], row["group"], tuple(row["shape"]), row["dtype"], row["codec"]) == \
            (m.label, m.group, m.shape, m.dtype, m.codec)
        files = [p for p in store.array_path(m.stack_id).rglob("*") if p.is_file()]
        assert row["stored_bytes"] == sum(p.stat().st_size for p in files) > 0
        assert row["raw_bytes"] == math.prod(m.shape)
        assert row["ratio"] == pytest.approx(row["raw_bytes"] / row["stored_bytes"], rel=1e-3)
    totals = out["totals"]
    assert set(totals) == {"SAIN", "MALADE", "all"}
    assert totals["SAIN"]["stacks"] == 2 and totals["MALADE"]["stacks"] == 2 and totals["all"]["stacks"] == 4
    for key in ("stored_bytes", "raw_bytes"):
        assert totals["all"][key] == sum(s[key] for s in out["stacks"])
        assert totals["SAIN"][key] == sum(s[key] for s in out["stacks"] if s["label"] == "SAIN")
    assert out["format_version"] == 1 and out["groups"] == 2


def test_table_has_every_stack_and_the_totals(info_store, capsys):
    assert main(["info", str(info_store)]) == 0
    text = capsys.readouterr().out
    summary = summarize(info_store)
    for row in summary["stacks"]:
        line = next(line for line in text.splitlines() if f" {row['stack_id']} " in line)
        assert row["label"] in line and "x".join(map(str, row["shape"])) in line and "uint8" in line
        assert f"{row['raw_bytes'] / 1e6:,.2f}" in line and f"{row['ratio']:.2f}x" in line
    for name, label in (("total SAIN", "SAIN"), ("total MALADE", "MALADE")):
        line = next(line for line in text.splitlines() if name in line)
        assert f"{summary['totals'][label]['stacks']} stacks" in line
    total = next(line for line in text.splitlines() if "total " in line and "4 stacks" in line)
    assert f"{summary['totals']['all']['stored_bytes'] / 1e6:,.2f}" in total


def test_unknown_format_version_is_refused(info_store, capsys):
    root = json.loads((info_store / "zarr.json").read_text())
    root["attributes"]["stacktrain"]["format_version"] = 42
    (info_store / "zarr.json").write_text(json.dumps(root))
    assert main(["info", str(info_store)]) == 2
    err = capsys.readouterr().err
    assert "format_version 42 is not supported" in " ".join(err.split()) and str(info_store) in err


def test_missing_store_is_one_line_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.zarr"), "--json"]) == 2
    err = capsys.readouterr().err
    assert "nope.zarr: store not found" in err and len(err.strip().splitlines()) == 1
