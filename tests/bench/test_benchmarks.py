"""Benchmarks at tiny size: JSON schema, positive finite values, ceiling sanity, CLI, GPU script wiring.
No speed is asserted; only relations that any honest measurement satisfies."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stacktrain import cli
from stacktrain.bench import data, report
from stacktrain.bench.loader_bench import CEILING_REPEAT, bench_loader
from stacktrain.bench.model_bench import bench_model
from stacktrain.bench.store_bench import bench_store
from stacktrain.bench.train_bench import bench_train

TINY = dict(chunk_zyx=(8, 16, 16), shard_zyx=(16, 32, 32))
PATCH = (8, 32, 32)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def tiny_store(cache):
    """Two generated stacks (SAIN, MALADE) of 16x64x64: 16 patches of 8x32x32 per epoch."""
    return data.generated_store(cache, stacks=2, shape_zyx=(16, 64, 64), **TINY)


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_generated_store_is_written_once_and_reused(cache, tiny_store):
    from stacktrain.stores.reader import Store
    before = (tiny_store / "zarr.json").stat().st_mtime_ns
    again = data.generated_store(cache, stacks=2, shape_zyx=(16, 64, 64), **TINY)
    assert again == tiny_store and (again / "zarr.json").stat().st_mtime_ns == before
    store = Store(tiny_store)
    assert [m.label for m in store.stacks] == ["SAIN", "MALADE"]
    vol = store.read(store.stack_ids[0])
    assert vol.dtype == np.uint8 and vol.shape == (3, 16, 64, 64)
    assert (vol == 0).any() and vol.std() > 10  # background and texture, like tissue
    desc = data.store_description(tiny_store)
    assert desc["stacks"] == 2 and positive_finite(desc["compression_ratio"])


def test_loader_bench_schema_and_ratios(tiny_store):
    r = bench_loader(store=tiny_store, loaders=["dali-cpu", "torch"], patch=PATCH, batch=4, workers=2,
                     segments=2, warmup=1)
    res = r["results"]
    assert set(res) == {"ram", "bytes", "decode", "source-bytes", "naive-zarr", "dali-cpu", "torch", "normalize-cpu"}
    assert res["dali-cpu"]["delivers"] == res["torch"]["delivers"] == "uint8"  # raw; normalised separately
    for kind in ("dali-cpu", "torch"):  # this process's share of the loader's CPU, apart from its workers'
        main, tree = res[kind]["main_cpu_ms_per_item"], res[kind]["cpu_ms_per_item"]
        assert positive_finite(main) and (tree is None or main <= tree * 1.05), kind
    norm = res.pop("normalize-cpu")
    assert positive_finite(norm["per_s"]) and norm["items_per_segment"] == 4 * 4 and norm["dtype"] == "fp32"
    for name, item in res.items():
        assert positive_finite(item["per_s"]) and positive_finite(item["gb_per_s"]), name
        assert len(item["segment_rates"]) == 2 and all(positive_finite(v) for v in item["segment_rates"])
        assert item["per_s"] == pytest.approx(float(np.median(item["segment_rates"])))
        # CEILING_REPEAT epochs of 16 patches per segment, for every measured thing alike
        assert item["items_per_segment"] == 16 * CEILING_REPEAT
    for name, ceiling in (("dali-cpu", "decode"), ("torch", "decode"), ("naive-zarr", "decode"),
                          ("source-bytes", "bytes")):
        assert res[name]["ceiling"] == ceiling
        assert res[name]["ratio_to_ceiling"] == pytest.approx(res[name]["per_s"] / res[ceiling]["per_s"])
        assert res[name]["ratio_to_naive"] == pytest.approx(res[name]["per_s"] / res["naive-zarr"]["per_s"])
    assert positive_finite(res["bytes"]["compressed_gb_per_s"])
    assert r["config"]["patch_bytes"] == 3 * 8 * 32 * 32
    assert {(b["loader"], b["target"]) for b in r["bars"]} == {("dali-cpu", 0.7), ("dali-cpu", 3.0),
                                                                ("source-bytes", 0.7)}
    assert not any(b["applies"] for b in r["bars"])  # bars are set for the default store only
    json.dumps(r)  # plain JSON all the way down


def test_loader_profile_per_patch_and_per_chunk(tiny_store):
    from stacktrain.bench.profile_loader import profile_dali_cpu
    from stacktrain.stores.reader import Store
    store = Store(tiny_store)
    prof = profile_dali_cpu(store, list(store.stack_ids), patch=PATCH, batch=4, dtype="fp32", seed=0)
    worker = prof["worker"]
    # an 8x32x32 patch on the 8x16x16 chunk grid: 3 channels x 1 x 2 x 2 chunks, more where jitter shifts it
    assert worker["chunks_per_patch"] >= 12
    stages = worker["stages_ms_per_patch"]
    assert set(stages) == set(worker["stages_us_per_chunk"]) and len(stages) == 3
    for name, ms in stages.items():
        assert ms >= 0 and worker["stages_us_per_chunk"][name] == pytest.approx(1e3 * ms / worker["chunks_per_patch"])
    assert sum(stages.values()) > 0
    timed = {"per_s": 1.0, "gb_per_s": 1.0, "cpu_ms_per_item": 9.0, "main_cpu_ms_per_item": 2.5}
    title, header, rows = report.loader_tables({"config": {"patches_per_segment": 16, "patch": list(PATCH), "batch": 4,
                                                           "workers": 2, "cores_available": 2, "dtype": "fp32"},
                                                "results": {"dali-cpu": timed}, "profile": prof})[-1]
    assert header == ["stage", "ms/patch", "us/chunk"] and "chunks per patch" in title
    assert [r[0] for r in rows[:3]] == ["worker: " + n for n in stages]
    assert [r[1] for r in rows[3:5]] == ["6.50", "2.50"]  # the timed run's tree minus its main process


def test_ceilings_sanity(cache):
    """(c) does (b)'s reads plus decoding, so it is never faster per patch. (a) >= (b) per byte moved
    holds where numpy copies long rows: patches of whole y-x planes against small chunks read run by
    run. (It does not hold for 32x256x256 crops here: numpy copies 256-byte rows at ~1.6 GB/s, the
    kernel copies page-cache bytes at ~8 GB/s; the loader results report the flag either way.)"""
    path = data.generated_store(cache, stacks=2, shape_zyx=(64, 64, 256), chunk_zyx=(8, 16, 16),
                                shard_zyx=(16, 32, 32))
    r = bench_loader(store=path, loaders=[], patch=(8, 64, 256), batch=1, workers=2, segments=5, warmup=1,
                     naive=False)
    assert r["sanity"] == {"bytes_ge_decode_per_patch": True, "ram_ge_bytes_per_byte_moved": True}


def test_store_bench_schema(cache):
    layouts = (((8, 16, 16), (16, 32, 32)), ((8, 32, 32), (16, 32, 32)))
    r = bench_store(cache=cache, shape_zyx=(16, 64, 64), patch=PATCH, layouts=layouts, patches=2, segments=1)
    rows = r["results"]
    assert [(row["codec"], tuple(row["chunk_zyx"])) for row in rows] == [
        (c, chunk) for c in ("lz4", "zstd", "blosc-lz4") for chunk, _ in layouts]
    for row in rows:
        assert positive_finite(row["compression_ratio"]) and positive_finite(row["stored_mb"])
        for kind in ("aligned", "unaligned"):
            assert positive_finite(row[kind]["per_s"]) and positive_finite(row[kind]["gb_per_s"])
        assert row["gpu_decodable"] == (row["codec"] == "lz4")
    assert rows[0]["chunks_per_aligned_patch"] == 3 * 1 * 2 * 2
    assert rows[2]["compression_ratio"] > rows[0]["compression_ratio"]  # zstd packs tighter than LZ4
    again = bench_store(cache=cache, shape_zyx=(16, 64, 64), patch=PATCH, layouts=layouts[:1], codecs=("lz4",),
                        patches=1, segments=1)
    assert again["results"][0]["write_s"] == pytest.approx(rows[0]["write_s"])  # cached, not rewritten


def test_model_bench_every_registered_model_tiny():
    from stacktrain.train.models import MODELS
    r = bench_model(patch=(16, 64, 64), batch=2, precision="fp32", tiny=True, segments=2, warmup=1)
    assert [row["model"] for row in r["results"]] == list(MODELS)
    assert positive_finite(r["matmul_peak_tflops"]) and r["peak_source"] == "measured"
    for row in r["results"]:
        for key in ("patches_per_s", "train_gflop_per_patch", "achieved_tflops", "fraction_of_peak",
                    "peak_memory_gib", "params"):
            assert positive_finite(row[key]), (row["model"], key)
        assert row["train_gflop_per_patch"] > row["forward_gflop_per_patch"]  # backward costs FLOPs too
        assert row["achieved_tflops"] == pytest.approx(row["train_gflop_per_patch"] * row["patches_per_s"] / 1e3)


def test_fallback_resnet_matches_monai_resnet3d50():
    """The GPU script's torch-only ResNet3D-50 has MONAI's parameter count and FLOPs."""
    from stacktrain.bench import resnet3d
    from stacktrain.train.models import model_card
    ours, monai = resnet3d.card((32, 64, 64)), model_card("resnet3d50", (32, 64, 64))
    assert ours["params"] == monai["params"]
    assert ours["train_gflop"] == pytest.approx(monai["train_gflop"], rel=1e-6)


def test_train_bench_data_wait_and_headroom(tiny_store):
    r = bench_train(store=tiny_store, loader="dali-cpu", model="resnet3d18", tiny=True, patch=PATCH, batch=4,
                    workers=2, segments=2, warmup=1, steps_per_segment=2)
    assert set(r["results"]) == {"model_alone", "loader_alone", "real"}
    assert all(positive_finite(v["per_s"]) for v in r["results"].values())
    assert 0 <= r["data_wait_pct"] <= 100 and len(r["data_wait_pct_segments"]) == 2
    assert r["loader_headroom"] == pytest.approx(r["results"]["loader_alone"]["per_s"]
                                                 / r["results"]["model_alone"]["per_s"])
    assert positive_finite(r["real_vs_model_alone"])


def test_cli_store_json_and_record(tmp_path, cache, capsys):
    out, results = tmp_path / "store.json", tmp_path / "results"
    argv = ["bench", "store", "--shape", "16", "64", "64", "--patch", *map(str, PATCH), "--codecs", "lz4",
            "--layouts", "8x16x16/16x32x32", "--patches", "1", "--segments", "1", "--quiet",
            "--cache", str(cache), "--json", str(out), "--record", str(results)]
    assert cli.main(argv) == 0
    assert json.loads(out.read_text())["bench"] == "store"
    assert "bench store" in capsys.readouterr().out  # the rich table
    (recorded,) = results.glob("*.json")
    assert recorded.name.startswith(f"{report.machine()['name']}-")
    merged = json.loads(recorded.read_text())
    assert set(merged["benches"]) == {"store"}
    report.record({"bench": "train", **_fake_train()}, results)  # a second bench joins the same file
    merged = json.loads(recorded.read_text())
    assert set(merged["benches"]) == {"store", "train"}
    md = recorded.with_suffix(".md").read_text()
    assert "bench store" in md and "bench train" in md and "| codec |" in md


def _fake_train() -> dict:
    item = {"per_s": 2.0, "cores_busy": 1.0}
    return {"config": {"model": "m", "tiny": True, "patch": [8, 32, 32], "batch": 4, "precision": "fp32",
                       "loader": "torch", "workers": 2, "device": "cpu"},
            "results": {"model_alone": item, "loader_alone": item, "real": item},
            "data_wait_pct": 5.0, "loader_headroom": 1.0, "real_vs_model_alone": 1.0}


@pytest.mark.parametrize("argv, message", [
    (["bench", "loader", "--loaders", "dali,warp"], "--loaders warp: unknown"),
    (["bench", "store", "--layouts", "16x64/32x256x256"], "--layouts '16x64/32x256x256'"),
    (["bench", "store", "--codecs", "gzip"], "--codecs gzip: unknown"),
    (["bench", "loader", "--store", "/nonexistent/s.zarr"], "--store /nonexistent/s.zarr: no such store"),
    (["bench", "model", "--models", "resnet9000"], "registered models"),
    (["bench", "train", "--segments", "0"], "--segments 0"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert cli.main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("error:") == 1


def test_gpu_script_without_cuda_skips(tmp_path, capsys):
    from stacktrain.bench import gpu_check
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the skip path is for CPU machines")
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith("skipped: no CUDA device")
    assert not (tmp_path / "out").exists()


def test_gpu_script_runs_check_and_benches_on_cpu_with_torch_candidate(tmp_path):
    """The same script, with the torch loader as candidate (runs anywhere): every case + benches + JSON."""
    from stacktrain.bench import gpu_check
    out = tmp_path / "out"
    argv = ["--out", str(out), "--reference", "dali-cpu", "--candidate", "torch", "--shape", "3", "16", "64", "64",
            "--patch", "8", "32", "32", "--stride", "8", "32", "32", "--batch-size", "4", "--workers", "2",
            "--no-near-limit", "--bench-stacks", "2", "--bench-shape", "16", "64", "64", "--model", "resnet3d18",
            "--model-batch", "4", "--tiny-models", "--bench-segments", "1", "--train-steps", "1",
            "--benches", "loader,train"]
    assert gpu_check.main(argv) == 0
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["status"] == "ok" and set(summary["benches"]) == {"loader", "train"}
    cases = summary["cases"]
    assert set(cases) == {"u8-fit-fp16-percentile", "u8-pad-bf16-scale", "u16-fit-bf16-meanstd"}
    for case in cases.values():
        for part in ("eval_no_aug", "train_aug"):
            assert case[part]["ok"] and case[part]["raw_equal"] and case[part]["patches"] > 0
    assert cases["u16-fit-bf16-meanstd"]["eval_no_aug"]["raw_dtype"] == "torch.uint16"
    assert cases["u8-pad-bf16-scale"]["case"]["edge"] == "pad"
    loader = json.loads((out / "bench_loader.json").read_text())
    assert {"dali", "dali-cpu", "torch"} & set(loader["results"]) == {"dali-cpu", "torch"}
    assert 0 <= json.loads((out / "bench_train.json").read_text())["data_wait_pct"] <= 100


def test_gpu_script_writes_json_on_failure_and_exits_1(tmp_path, monkeypatch):
    from stacktrain.bench import gpu_cases, gpu_check
    monkeypatch.setattr(gpu_cases, "run_case", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    argv = ["--out", str(tmp_path / "out"), "--candidate", "torch", "--no-near-limit", "--benches", "none"]
    assert gpu_check.main(argv) == 1
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert summary["status"] == "error" and summary["error"] == "OSError: disk full"


@pytest.mark.slow  # one of the heaviest integration tests: `make test-slow` (CI) runs it
def test_gpu_script_needs_no_monai_scipy_or_sklearn(tmp_path):
    """What the offline GPU node lacks must not be imported: run the script with them blocked."""
    import subprocess
    import sys
    code = ("import sys\n"
            "for m in ('monai', 'scipy', 'sklearn', 'optuna', 'matplotlib', 'nibabel', 'pydicom', 'tifffile',\n"
            "          'PIL', 'imagecodecs', 'typer', 'pydantic'):\n"
            "    sys.modules[m] = None\n"
            "from stacktrain.bench import gpu_check\n"
            f"sys.exit(gpu_check.main(['--out', {str(tmp_path / 'o')!r}, '--candidate', 'torch', '--shape', '3', '16',"
            " '64', '64', '--patch', '8', '32', '32', '--stride', '8', '32', '32', '--batch-size', '4', '--workers',"
            " '1', '--no-near-limit', '--benches', 'model', '--model-batch', '2', '--bench-segments', '1',"
            " '--bench-stacks', '1', '--bench-shape', '16', '64', '64']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "o" / "gpu_check.json").read_text())
    assert report["status"] == "ok"
    model = json.loads((tmp_path / "o" / "bench_model.json").read_text())
    assert model["config"]["models_from"].startswith("benchmarks.resnet3d")


def test_inflate_limit_case_geometry():
    """The near-limit cases: one batch just under CUDA's 65535 chunks per inflate call, one that needs more calls."""
    import argparse

    from stacktrain.bench import gpu_cases
    from stacktrain.pipelines.inflate import inflate_plan
    args = argparse.Namespace(shape=[3, 64, 512, 512], patch=[32, 256, 256], stride=[16, 128, 128], batch_size=16,
                              near_limit=True)
    near = [c for c in gpu_cases.cases(args) if c["name"].startswith("near-limit")]
    plans = [inflate_plan(patch_zyx=c["patch"], chunk_zyx=c["chunk"], channels=3, batch=c["batch"]) for c in near]
    assert [p.groups for p in plans] == [1, 3]
    assert 65535 - 225 < plans[0].max_chunks_per_call <= 65535


def test_bench_help_lists_the_four_benches(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("loader", "store", "model", "train"))


def test_gather_with_a_whole_absent_shard_and_pooled_buffers(tmp_path):
    """stores.chunks.gather (optimised for the bars): a shard with no stored chunk reads as zeros, and
    a recycled buffer is never handed out while a region still uses it."""
    from stacktrain.stores import chunks
    from stacktrain.stores.reader import Store
    from stacktrain.testing import tissue, write_array
    arr = tissue((3, 16, 64, 64), seed=4)
    arr[:, :, :32, :32] = 0  # one whole 16x32x32 shard is fill: zarr writes no file for it
    write_array(tmp_path / "s.zarr", "a", arr)
    store = Store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store.read("a"), arr)
    pool = chunks.BufferPool(max_bytes=8 << 20)
    first = pool.take(2 << 20)
    first[:] = 7
    address = first.__array_interface__["data"][0]
    second = pool.take(2 << 20)  # `first` is alive: must be a different buffer
    assert not np.shares_memory(first, second)
    view = first[10:]
    del first
    assert pool.take(2 << 20).__array_interface__["data"][0] != address  # a view still uses it
    del view
    assert pool.take(1 << 20).__array_interface__["data"][0] == address  # free again: recycled
    assert len(pool._buffers) == 3  # first, second, and the one handed out while the view lived
