"""Axis orders: --axes is a default for files that do not say theirs; it never overrides a file whose
metadata states its axes (ImageJ/OME TIFF, NIfTI, DICOM, slice folders), and a manifest cell that
contradicts such a file is refused, naming both orders."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from stacktrain.cli import main
from stacktrain.errors import InputError
from stacktrain.stores.convert import ConversionFailed, ConvertOptions, convert
from stacktrain.stores.reader import Store
from stacktrain.stores.sources import open_source
from stacktrain.testing import tissue
from tests.stores.test_convert import TINY, write_manifest

ZCYX = tissue((3, 20, 24, 32), seed=3).transpose(1, 0, 2, 3).copy()  # (z, c, y, x), as ImageJ stores it


@pytest.fixture
def files(tmp_path):
    """An ImageJ hyperstack (axes ZCYX in its metadata), a bare npy whose shape says nothing
    (3 x 20 x 24 x 3: c first or last?) and a bare multi-page TIFF (tifffile calls its first axis Q)."""
    tifffile.imwrite(tmp_path / "imagej.tif", ZCYX, imagej=True, metadata={"axes": "ZCYX"})
    np.save(tmp_path / "amb.npy", tissue((3, 20, 24, 3), seed=4))
    tifffile.imwrite(tmp_path / "bare.tif", tissue((3, 20, 24, 32), seed=5).transpose(1, 2, 3, 0).reshape(20, 24, 96))
    return tmp_path


def test_the_reader_knows_which_files_state_their_axes(files):
    assert open_source(files / "imagej.tif")._reader.stated_axes
    assert not open_source(files / "bare.tif", axes="zyx")._reader.stated_axes
    with pytest.raises(InputError, match="cannot tell the axes"):
        open_source(files / "amb.npy")


def test_axes_option_applies_to_the_ambiguous_file_and_not_to_the_imagej_one(files, tmp_path):
    manifest = write_manifest(files, [("imagej.tif", "ij", "SAIN", "p0"), ("amb.npy", "amb", "MALADE", "p1")])
    opts = ConvertOptions(axes="czyx", **{**TINY, "min_patch_zyx": (4, 16, 3)})  # the npy is 3 wide
    report = convert(manifest, tmp_path / "s.zarr", opts)
    notes = {o.stack_id: o.note for o in report.outcomes}
    assert notes["amb"] is None
    assert "--axes czyx not applied" in notes["ij"] and "zcyx" in notes["ij"]
    store = Store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store.read("ij"), ZCYX.transpose(1, 0, 2, 3))  # the file's own order
    np.testing.assert_array_equal(store.read("amb"), np.load(files / "amb.npy"))  # --axes czyx


def test_a_cell_that_contradicts_the_files_metadata_is_refused(files, tmp_path):
    manifest = write_manifest(files, [("imagej.tif", "ij", "SAIN", "p0", "czyx")])
    with pytest.raises(ConversionFailed) as e:
        convert(manifest, tmp_path / "s.zarr", ConvertOptions(**TINY))
    message = e.value.report.outcomes[0].error
    assert "axes cell says 'czyx'" in message and "states 'zcyx'" in message and "imagej.tif" in message


def test_a_cell_that_agrees_or_a_file_without_stated_axes_follows_the_cell(files, tmp_path):
    manifest = write_manifest(files, [("imagej.tif", "ij", "SAIN", "p0", "zcyx"),
                                      ("bare.tif", "bare", "MALADE", "p1", "zyx")])
    report = convert(manifest, tmp_path / "s.zarr", ConvertOptions(replicate_channels=True, **TINY))
    assert [o.status for o in report.outcomes] == ["converted", "converted"]
    assert Store(tmp_path / "s.zarr").meta("bare").shape == (3, 20, 24, 96)


def test_the_cli_prints_the_note(files, tmp_path, capsys):
    manifest = write_manifest(files, [("imagej.tif", "ij", "SAIN", "p0")])
    code = main(["convert", str(manifest), "--out", str(tmp_path / "s.zarr"), "--axes", "czyx", "--workers", "1",
                 "--min-patch", "4", "16", "16", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "ij: --axes czyx not applied: the file's metadata states zcyx" in out
