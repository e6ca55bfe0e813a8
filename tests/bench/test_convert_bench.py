"""`bench convert` at a tiny size: the structure of the results, ratios computed from the rates, RSS
read per run, the inputs generated once, the table and the CLI. No speed is asserted."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stacktrain import cli
from stacktrain.bench import report
from stacktrain.bench.convert_bench import bench_convert
from stacktrain.bench.convert_runs import generated_inputs

SHAPE = (8, 64, 64)
ROWS = {"ceiling", "peer", "convert 1", "convert N", "convert N, pyramid"}


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    cache = tmp_path_factory.mktemp("convert-bench")
    return cache, bench_convert(cache=cache, stacks=2, shape_zyx=SHAPE, formats=("tiff", "npy"), workers=2,
                                segments=2, warmup=0)


@pytest.mark.slow  # one of the heaviest integration tests: `make test-slow` (CI) runs it
def test_every_row_is_measured_and_the_ratios_follow_from_the_rates(result):
    _, r = result
    assert r["bench"] == "convert" and r["config"]["workers"] == 2 and set(r["results"]) == {"tiff", "npy"}
    assert r["config"]["default_levels"] == 0  # 64x64: under 256, no pyramid level by default
    for fmt, part in r["results"].items():
        rows = part["results"]
        assert set(rows) == ROWS, fmt
        assert part["source_bytes"] > 2 * 3 * int(np.prod(SHAPE))  # files hold at least the voxels
        for name, row in rows.items():
            assert len(row["segment_rates"]) == 2 and all(positive_finite(v) for v in row["segment_rates"])
            assert row["source_mb_per_s"] == pytest.approx(float(np.median(row["segment_rates"])))
            assert row["segment_rates"][0] == pytest.approx(part["source_bytes"] / row["wall_s"][0] / 1e6)
            assert positive_finite(row["cores_busy"]) and positive_finite(row["peak_rss_mb"]), (fmt, name)
            assert row["ratio_to_ceiling"] == pytest.approx(row["source_mb_per_s"] / rows["ceiling"]["source_mb_per_s"])
            assert row["ratio_to_peer"] == pytest.approx(row["source_mb_per_s"] / rows["peer"]["source_mb_per_s"])
        assert rows["ceiling"]["ratio_to_ceiling"] == pytest.approx(1.0)
        assert rows["convert 1"]["processes"] == 1 and rows["convert N"]["processes"] == 2
        goals = {g["goal"]: g for g in part["goals"]}
        assert len(goals) == (4 if fmt == "tiff" else 3)
        assert not any(g["applies"] for g in goals.values())  # set for the default size
        assert goals["convert N >= 1.0x peer"]["value"] == rows["convert N"]["ratio_to_peer"]
        rss = next(g for name, g in goals.items() if "RSS" in name)
        assert rss["target"] == pytest.approx(rows["peer"]["peak_rss_mb"] + 256)
        assert rss["met"] == (rows["convert N"]["peak_rss_mb"] <= rss["target"])
    deep = r["results"]["tiff"]["deeper"]  # the RSS-against-depth run, on the first format only
    assert deep["shape_zyx"] == [2 * SHAPE[0], *SHAPE[1:]] and positive_finite(deep["peak_rss_mb"])
    depth_goal = r["results"]["tiff"]["goals"][-1]
    assert depth_goal["value"] == pytest.approx(deep["peak_rss_mb"] / r["results"]["tiff"]["results"]["convert N"]
                                                ["peak_rss_mb"])
    assert "deeper" not in r["results"]["npy"]
    json.dumps(r)


@pytest.mark.slow  # one of the heaviest integration tests: `make test-slow` (CI) runs it
def test_inputs_are_generated_once_and_convert_round_trips_them(result, tmp_path):
    from stacktrain.stores.convert import ConvertOptions, convert
    from stacktrain.stores.reader import Store
    from stacktrain.stores.sources import open_source
    cache, _ = result
    manifest, paths, size = generated_inputs(cache, "tiff", stacks=2, shape_zyx=SHAPE, seed=0)
    before = [p.stat().st_mtime_ns for p in paths]
    assert generated_inputs(cache, "tiff", stacks=2, shape_zyx=SHAPE, seed=0) == (manifest, paths, size)
    assert [p.stat().st_mtime_ns for p in paths] == before
    assert open_source(paths[0]).axes == "zyxc"  # multi-page RGB pages
    convert(manifest, tmp_path / "s.zarr", ConvertOptions(min_patch_zyx=SHAPE, workers=1))
    want = np.concatenate([s for _, s in open_source(paths[1]).slabs(4)], axis=1)
    np.testing.assert_array_equal(Store(tmp_path / "s.zarr").read("s01"), want)


@pytest.mark.slow  # one of the heaviest integration tests: `make test-slow` (CI) runs it
def test_tables_and_markdown(result):
    _, r = result
    tables = report.convert_tables(r)
    assert len(tables) == 4  # per format: the rows and the goals
    title, headers, rows = tables[0]
    assert "cores used" in headers and len(rows) == 6 and rows[0][1] == "2" and "2x deeper" in rows[-1][0]
    assert rows[4][0] == "stacktrain convert --workers N (default pyramid levels)"
    assert "bench convert (tiff)" in report.markdown({"machine": {"name": "m", "cores": 2, "cpu": "c", "gpu": None,
                                                                  "torch": "t", "dali": None},
                                                      "date": "d", "benches": {"convert": r}})


def test_cli_refuses_an_unknown_format(capsys):
    assert cli.main(["bench", "convert", "--formats", "png", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--formats png" in err and "tiff" in err
