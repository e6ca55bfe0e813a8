"""Dataset-level bit depth (`convert --dtype/--window`): one dtype per store, one recorded intensity mapping,
refused mixes and changes, exact percentiles over the manifest, lossless int16 offset, predict's check."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
from rich.console import Console

from stacktrain.cli import main
from stacktrain.errors import ConfigError, ConversionFailed, InputError
from stacktrain.stores import intensity
from stacktrain.stores.convert import ConvertOptions, Progress, convert
from stacktrain.stores.export import export
from stacktrain.stores.info import summarize
from stacktrain.stores.maintain import relabel
from stacktrain.stores.reader import Store
from stacktrain.stores.sources import open_source
from stacktrain.testing import tissue
from stacktrain.ui import ConvertBar
from tests.stores.test_convert import write_manifest

TINY = dict(chunk_zyx=(4, 16, 16), shard_zyx=(8, 16, 16), min_patch_zyx=(4, 16, 16), workers=1)
NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"


def _sources(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    """One .npy per array and a manifest listing them (alternating labels), in `folder` (made if needed)."""
    folder.mkdir(exist_ok=True)
    rows = []
    for i, (sid, a) in enumerate(arrays.items()):
        np.save(folder / f"{sid}.npy", a)
        rows.append((f"{sid}.npy", sid, "MALADE" if i % 2 else "SAIN", f"p{i}"))
    return write_manifest(folder, rows)


def _u16(seed: int, shape=(3, 6, 16, 16)) -> np.ndarray:
    return (tissue(shape, seed=seed, dtype=np.uint16) // 8).astype(np.uint16)  # 0..~6500, like a 13-bit camera


def _i16(seed: int) -> np.ndarray:
    return (_u16(seed).astype(np.int32) - 3000).astype(np.int16)  # -3000..~3500


def _windowed(a: np.ndarray, low: float, high: float) -> np.ndarray:
    """The window mapping onto uint8 written out in float64 (the reference)."""
    return np.rint((np.clip(a.astype(np.float64), low, high) - low) * (255 / (high - low))).astype(np.uint8)


def _root(store: Path) -> dict:
    return json.loads((store / "zarr.json").read_text())["attributes"]["stacktrain"]


class Scans(Progress):
    def __init__(self):
        self.seen: list[tuple[int, int]] = []

    def scan(self, done, total):
        self.seen.append((done, total))


def test_mixed_manifest_is_refused_without_dtype(tmp_path):
    manifest = _sources(tmp_path, {"a8": tissue((3, 6, 16, 16), seed=1), "b16": _u16(2)})
    out = tmp_path / "s.zarr"
    cmd = [sys.executable, "-m", "stacktrain", "convert", str(manifest), "--out", str(out), "--no-progress",
           "--min-patch", "4", "16", "16", "--chunk", "4", "16", "16", "--shard", "8", "16", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for word in ("uint8 (a8)", "uint16 (b16)", "--dtype uint8 --window", "nothing was converted"):
        assert word in err
    assert not out.exists()


def test_mixed_manifest_with_dtype_and_window(tmp_path, capsys):
    a8, b16 = tissue((3, 6, 16, 16), seed=1), _u16(2)
    manifest = _sources(tmp_path, {"a8": a8, "b16": b16})
    out = tmp_path / "s.zarr"
    opts = {**TINY, "workers": 2}  # the workers map their stacks by the record the parent wrote
    convert(manifest, out, ConvertOptions(dtype="uint8", window=("0", "4095"), **opts))
    store = Store(out)
    np.testing.assert_array_equal(store.read("a8"), a8)  # already uint8: as it is
    np.testing.assert_array_equal(store.read("b16"), _windowed(b16, 0, 4095))
    assert {m.dtype for m in store.stacks} == {"uint8"} and _root(out)["dtype"] == "uint8"
    assert _root(out)["mapping"] == {"kind": "window", "low": 0.0, "high": 4095.0, "asked": ["0", "4095"],
                                     "source_dtypes": ["uint16", "uint8"]}
    assert store.meta("b16").intensity == {"kind": "window", "source_dtype": "uint16", "low": 0.0, "high": 4095.0}
    assert store.meta("a8").intensity == {"kind": "identity", "source_dtype": "uint8"}
    summary = summarize(out)
    assert summary["dtype"] == "uint8" and summary["mapping"]["kind"] == "window"
    assert [s["intensity"]["kind"] for s in summary["stacks"]] == ["identity", "window"]
    assert main(["info", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "uint8 (window 0..4095)" in text and "window 0..4095 of uint16" in text and "as is (uint8)" in text
    record = intensity.mapping_of(out)
    relabel(out, "a8", "MALADE")  # maintenance rewrites the root list and keeps the record
    assert intensity.mapping_of(out) == record
    copy = export(out, tmp_path / "copy.zarr")
    assert intensity.mapping_of(tmp_path / "copy.zarr") == intensity.mapping_of(out)
    assert [m.intensity for m in copy] == [m.intensity for m in store.stacks]


WINDOW_CASES = [
    ("two-uint16", {"u": _u16(3, (3, 7, 16, 16)), "v": _u16(4, (3, 5, 20, 16))}),
    ("int16-and-uint16", {"i": _i16(5), "u": _u16(6)}),
]


@pytest.mark.parametrize("arrays", [c[1] for c in WINDOW_CASES], ids=[c[0] for c in WINDOW_CASES])
def test_percentile_window_is_numpys_over_the_whole_manifest(tmp_path, arrays):
    manifest = _sources(tmp_path, arrays)
    out = tmp_path / "s.zarr"
    progress = Scans()
    convert(manifest, out, ConvertOptions(dtype="uint8", window=("p0.5", "p99.5"), **TINY), progress=progress)
    every = np.concatenate([a.ravel().astype(np.int64) for a in arrays.values()])
    low, high = np.percentile(every, 0.5), np.percentile(every, 99.5)
    mapping = _root(out)["mapping"]
    assert (mapping["low"], mapping["high"]) == (low, high) and mapping["asked"] == ["p0.5", "p99.5"]
    total = sum(a.nbytes for a in arrays.values())
    assert progress.seen[0] == (0, total) and progress.seen[-1] == (total, total)
    store = Store(out)
    for sid, a in arrays.items():  # one window for every stack, never per stack
        np.testing.assert_array_equal(store.read(sid), _windowed(a, low, high))


def test_the_percentile_pass_has_a_byte_bar():
    buf = io.StringIO()
    bar = ConvertBar(Console(file=buf, width=150))
    for done in (0, 5_000_000, 10_000_000):
        bar.scan(done, 10_000_000)
    assert "percentiles over the manifest" in buf.getvalue() and "10.0/10.0 MB" in buf.getvalue()


def test_percentile_window_is_reused_when_the_store_grows(tmp_path):
    out = tmp_path / "s.zarr"
    opts = ConvertOptions(dtype="uint8", window=("p1", "p99"), **TINY)
    convert(_sources(tmp_path / "one", {"u": _u16(7)}), out, opts)
    before = _root(out)["mapping"]
    later = _u16(8) * 2  # other statistics: recomputing them would change the store's window
    progress = Scans()
    convert(_sources(tmp_path, {"u": _u16(7), "w": later}), out, opts, progress=progress)
    assert progress.seen == [] and _root(out)["mapping"] == before
    np.testing.assert_array_equal(Store(out).read("w"), _windowed(later, before["low"], before["high"]))


def _int16_synthetic(folder: Path) -> tuple[str, np.ndarray]:
    a = np.random.default_rng(9).integers(-32768, 32768, (3, 5, 16, 16)).astype(np.int16)
    a[0, 0, 0, :2] = (-32768, 32767)
    np.save(folder / "ct.npy", a)
    return "ct.npy", a


def _int16_nifti(folder: Path) -> tuple[str, np.ndarray]:
    path = NIBABEL_DATA / "anatomical.nii"  # nibabel's shipped int16 (big-endian) volume, -610..30393
    return str(path), np.asarray(nibabel.load(path).dataobj.get_unscaled()).T[np.newaxis]


def _int16_dicom(folder: Path) -> tuple[str, np.ndarray]:
    from pydicom.data import get_testdata_file
    path = Path(get_testdata_file("examples_ybr_color.dcm")).parent / "dicomdirtests/98892001/CT5N"  # a CT series
    return str(path), np.concatenate([s for _, s in open_source(path).slabs(8)], axis=1)


INT16_CASES = [("synthetic-npy", _int16_synthetic), ("nibabel-anatomical-nii", _int16_nifti),
               ("pydicom-ct-series", _int16_dicom)]


@pytest.mark.parametrize("make", [c[1] for c in INT16_CASES], ids=[c[0] for c in INT16_CASES])
def test_int16_offset_round_trips_exactly(tmp_path, make):
    path, source = make(tmp_path)
    assert source.dtype.name == "int16"  # (the synthetic one and the NIfTI hold negatives)
    out = tmp_path / "s.zarr"
    convert(write_manifest(tmp_path, [(path, "ct", "SAIN", "p")]), out,
            ConvertOptions(dtype="uint16", replicate_channels=True, pad=True, **TINY))
    stored = Store(out).read("ct")
    c, z, y, x = source.shape
    assert stored.dtype == np.uint16
    back = stored[:, :z, :y, :x].astype(np.int32) - intensity.OFFSET
    np.testing.assert_array_equal(back, np.broadcast_to(source, (3, z, y, x)))
    assert _root(out)["mapping"] == {"kind": "offset", "offset": 32768, "source_dtypes": ["int16"]}
    assert Store(out).meta("ct").intensity == {"kind": "offset", "source_dtype": "int16", "offset": 32768}


def test_another_dtype_is_refused_by_an_existing_store(tmp_path):
    out = tmp_path / "s.zarr"
    a8 = tissue((3, 6, 16, 16), seed=1)
    convert(_sources(tmp_path / "one", {"a8": a8}), out, ConvertOptions(**TINY))
    b16 = _u16(2)
    manifest = _sources(tmp_path, {"a8": a8, "b16": b16})
    with pytest.raises(ConversionFailed) as e:
        convert(manifest, out, ConvertOptions(**TINY))
    error = e.value.report.outcomes[1].error
    for word in ("stack 'b16'", "b16.npy", "dtype uint16", "holds uint8", "--dtype uint8 --window LOW HIGH"):
        assert word in error
    assert Store(out).stack_ids == ["a8"] and not (out / "b16").exists()
    # the fix it names: the stored uint8 stack stays as it is, the uint16 one is windowed into uint8
    convert(manifest, out, ConvertOptions(dtype="uint8", window=("0", "4095"), **TINY))
    np.testing.assert_array_equal(Store(out).read("b16"), _windowed(b16, 0, 4095))
    np.testing.assert_array_equal(Store(out).read("a8"), a8)


CHANGE_CASES = [
    ("other-window", dict(dtype="uint8", window=("0", "1000")), ["window 0..4095", "--window 0 1000"]),
    ("other-dtype", dict(dtype="uint16"), ["uint8 (window 0..4095)", "--dtype uint16"]),
    ("minmax", dict(scale="minmax"), ["uint8 (window 0..4095)", "--scale minmax"]),
]


@pytest.mark.parametrize("change, words", [c[1:] for c in CHANGE_CASES], ids=[c[0] for c in CHANGE_CASES])
def test_a_store_keeps_its_mapping(tmp_path, change, words):
    out = tmp_path / "s.zarr"
    manifest = _sources(tmp_path, {"u": _u16(1)})
    convert(manifest, out, ConvertOptions(dtype="uint8", window=("0", "4095"), **TINY))
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".lock"}
    with pytest.raises(InputError) as e:
        convert(manifest, out, ConvertOptions(overwrite=True, **change, **TINY))
    assert str(out) in str(e.value) and "new --out" in str(e.value)
    for word in words:
        assert word in str(e.value)
    assert {p: p.read_bytes() for p in files} == files
    convert(manifest, out, ConvertOptions(**TINY))  # options left out: the store's own mapping


OPTION_CASES = [
    ("window-without-dtype", dict(window=("0", "10")), "give --dtype uint8 or --dtype uint16 too"),
    ("window-and-scale", dict(dtype="uint8", window=("0", "10"), scale="clip"), "give one of them"),
    ("scale-to-uint16", dict(dtype="uint16", scale="minmax"), "--scale minmax stores uint8"),
    ("bad-bound", dict(dtype="uint8", window=("q5", "10")), "--window q5: give a value"),
    ("percentile-over-100", dict(dtype="uint8", window=("p0", "p101")), "--window p101"),
    ("not-finite", dict(dtype="uint8", window=("0", "inf")), "--window inf: give a value"),
    ("low-above-high", dict(dtype="uint8", window=("10", "-5")), "LOW must be below HIGH"),
]


@pytest.mark.parametrize("kw, words", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_option_combinations_that_name_no_mapping_are_refused(kw, words):
    with pytest.raises(ConfigError) as e:
        ConvertOptions(**kw)
    assert words in str(e.value)


def test_predict_refuses_a_store_of_another_mapping(tmp_path):
    import torch

    from stacktrain.train.checkpoint import save_checkpoint
    from stacktrain.train.config import config_to_dict
    from stacktrain.train.models import build_model
    from stacktrain.train.predict import predict
    from tests.support import tiny_config

    u = {"u": _u16(1), "v": _u16(2)}
    for name, opts in (("train", dict(dtype="uint8", window=("p1", "p99"))), ("other", dict(scale="minmax"))):
        convert(_sources(tmp_path / name, u), tmp_path / f"{name}.zarr", ConvertOptions(**opts, **TINY))
    trained = intensity.mapping_of(tmp_path / "train.zarr")
    ckpt = tmp_path / "best.pt"
    torch.manual_seed(0)
    save_checkpoint(ckpt, model=build_model("resnet3d18", tiny=True), optimizer=None, scaler=None, epoch=0,
                    early_stopping=None, config=config_to_dict(tiny_config(tmp_path / "train.zarr", tmp_path / "s")),
                    model_name="resnet3d18", model_tiny=True, data={"intensity": trained})
    with pytest.raises(ConfigError) as e:
        predict(ckpt, tmp_path / "other.zarr", tmp_path / "pred")
    low = intensity.num(trained["mapping"]["low"])
    for word in ("other.zarr", "uint8 (min-max per stack)", f"uint8 (window {low}..", "from p1 p99",
                 f"--dtype uint8 --window {low}"):
        assert word in str(e.value)
    assert not (tmp_path / "pred").exists()


RECORDED_CASES = [
    ("identity", dict(), lambda seed: tissue((3, 6, 16, 16), seed=seed)),
    ("offset", dict(dtype="uint16"), _i16),
    ("window", dict(dtype="uint8", window=("p1", "p99")), _u16),
    ("minmax", dict(scale="minmax"), _u16),  # the explicit per-stack option, now for uint16 sources too
]


@pytest.mark.parametrize("kind, opts, make", RECORDED_CASES, ids=[c[0] for c in RECORDED_CASES])
def test_convert_options_of_a_recorded_mapping_give_the_same_mapping(tmp_path, kind, opts, make):
    """The way out predict's refusal names, and what a later step (predict on raw stacks) uses: a store's
    record -> ConvertOptions -> new stacks converted with the same mapping."""
    for name, seed in (("first", 1), ("later", 2)):
        manifest = _sources(tmp_path / name, {"s": make(seed)})
        given = ConvertOptions(**opts, **TINY) if name == "first" else ConvertOptions(**TINY).with_mapping(
            intensity.mapping_of(tmp_path / "first.zarr"))
        convert(manifest, tmp_path / f"{name}.zarr", given)
    first, later = (intensity.mapping_of(tmp_path / f"{n}.zarr") for n in ("first", "later"))
    meta = Store(tmp_path / "first.zarr").meta("s")  # minmax: uint16 stored as uint8, by the stack's range
    assert first["mapping"]["kind"] == meta.intensity["kind"] == kind and meta.dtype == first["dtype"]
    if kind == "minmax":
        assert (meta.intensity["low"], meta.intensity["high"]) == (make(1).min(), make(1).max())
    assert intensity.mapping_key(later) == intensity.mapping_key(first)
    intensity.require_same(first, tmp_path / "later.zarr", "best.pt")  # what predict checks: no error
