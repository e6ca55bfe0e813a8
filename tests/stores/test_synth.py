"""`synth`: deterministic, every input format, balanced labels in patient groups, lesions in some regions."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from stacktrain.errors import InputError
from stacktrain.stores.sources import open_source, source_sha256
from stacktrain.stores.synth import FORMATS, REGION_ZYX, plan, synth

SHAPE = (16, 32, 32)
N = len(FORMATS)  # one stack per format


def rows(csv_path):
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def fingerprint(out_dir):
    return {r["path"]: source_sha256(out_dir / r["path"]) for r in rows(out_dir / "labels.csv")}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    return synth(out, stacks=N, shape_zyx=SHAPE, seed=5, progress=False)


def test_deterministic_bytes(raw, tmp_path):
    again = synth(tmp_path / "again", stacks=N, shape_zyx=SHAPE, seed=5, progress=False)
    assert again.read_bytes() == raw.read_bytes()
    assert fingerprint(again.parent) == fingerprint(raw.parent)
    rerun = synth(tmp_path / "again", stacks=N, shape_zyx=SHAPE, seed=5, progress=False)  # in place
    assert fingerprint(rerun.parent) == fingerprint(raw.parent)
    assert sorted(p.name for p in rerun.parent.iterdir()) == sorted([*fingerprint(raw.parent), "labels.csv"])
    other = synth(tmp_path / "other", stacks=N, shape_zyx=SHAPE, seed=6, progress=False)
    assert fingerprint(other.parent) != fingerprint(raw.parent)


def test_every_format_written_and_read_back_exactly(raw):
    table = rows(raw)
    assert list(table[0]) == ["path", "stack_id", "label", "group"]
    items = {s.stack_id: s for s in plan(N, SHAPE, seed=5)}
    formats = set()
    for row in table:
        path = raw.parent / row["path"]
        assert path.exists() and not Path(row["path"]).is_absolute()  # relative to the csv
        src = open_source(path)  # axes inferred everywhere: no `axes` column needed
        item = items[row["stack_id"]]
        formats.add(src.format)
        assert src.shape == (3, *SHAPE) and src.dtype == item.dtype
        np.testing.assert_array_equal(np.concatenate([s for _, s in src.slabs(5)], axis=1), item.volume())
        if item.format in ("ome-tiff", "nifti", "dicom", "dicom-series"):
            assert src.spacing_zyx == pytest.approx((2.0, 0.5, 0.5))
    assert formats == {"tiff", "slices", "nifti", "npy", "dicom"}
    assert {s.format for s in items.values()} == set(FORMATS)
    assert {s.dtype for s in items.values()} == {np.dtype(np.uint8)}


def test_uint16_stacks_hold_the_uint8_texture_scaled():
    a, b = plan(2, SHAPE, 0), plan(2, SHAPE, 0, dtype="uint16")
    assert all(s.dtype == np.uint16 for s in b)
    np.testing.assert_array_equal(b[1].volume(), a[1].volume().astype(np.uint16) * 257)


def test_labels_and_patient_groups():
    for seed in range(3):
        items = plan(24, SHAPE, seed)
        malade = sum(s.label == "MALADE" for s in items)
        assert {s.label for s in items} == {"SAIN", "MALADE"} and abs(malade - 12) <= 2
        groups = {}
        for s in items:
            groups.setdefault(s.group, set()).add((s.stack_id, s.label))
        assert max(len(g) for g in groups.values()) >= 2  # some patients have several stacks
        assert all(len({label for _, label in g}) == 1 for g in groups.values())  # one label per patient
        assert len({s.stack_id for s in items}) == 24


def test_texture_background_and_lesions_in_some_regions():
    items = plan(12, (48, 96, 96), seed=0)
    for s in items:
        vol = s.volume().astype(np.float64) / (257 if s.dtype == np.uint16 else 1)
        background = (vol == 0).all(axis=0)
        assert 0.1 < background.mean() < 0.5  # empty regions, but mostly tissue
        assert vol[:, ~background].min() >= 1 and vol[:, ~background].std() > 10  # not constant
        mask = s.lesion_mask()
        if s.label == "SAIN":
            assert not mask.any()
            continue
        z, y, x = REGION_ZYX
        cells = [mask[a:a + z, b:b + y, c:c + x].any()
                 for a in range(0, 48, z) for b in range(0, 96, y) for c in range(0, 96, x)]
        assert 0.15 <= np.mean(cells) <= 0.6, s.stack_id  # lesions only in some regions
        tissue = ~background & ~mask
        # Visible: brighter in channels 0 and 2, darker in channel 1 than the surrounding tissue.
        diff = [vol[c][mask].mean() - vol[c][tissue].mean() for c in range(3)]
        assert diff[0] > 30 and diff[1] < -20 and diff[2] > 30, (s.stack_id, diff)


def test_slabs_do_not_depend_on_depth():
    item = plan(1, (20, 40, 40), seed=2)[0]
    whole = item.slab(0, 20)
    np.testing.assert_array_equal(np.concatenate([item.slab(z, min(z + 3, 20)) for z in range(0, 20, 3)],
                                                 axis=1), whole)


def test_bad_arguments():
    with pytest.raises(InputError, match="--stacks"):
        plan(0)
    with pytest.raises(InputError, match="--shape"):
        plan(3, (4, 32, 32))


def test_prevalence_patient_effect_and_difficulty():
    """Prevalence sets the share of MALADE stacks; a patient's stacks share their staining (so stacks of
    one patient are closer than stacks of two); difficulty shrinks the lesions' share of the tissue."""
    import numpy as np

    from stacktrain.stores.synth import plan
    items = plan(40, (16, 64, 64), seed=1, prevalence=0.25)
    assert abs(sum(s.label == "MALADE" for s in items) / 40 - 0.25) <= 0.05
    assert len({s.label for s in items if s.group == items[0].group}) == 1  # labels per patient

    def bases(effect):
        stacks = plan(30, (16, 64, 64), seed=2, patient_effect=effect)
        by = {}
        for s in stacks:
            by.setdefault(s.group, []).append(s.model.base)
        within = [np.abs(v[0] - v[1]).mean() for v in by.values() if len(v) > 1]
        firsts = np.array([v[0] for v in by.values()])
        between = np.abs(firsts[:, None] - firsts[None]).mean(axis=2)[np.triu_indices(len(firsts), 1)]
        return np.mean(within), np.mean(between)
    within, between = bases(2.0)
    plain_within, plain_between = bases(0.0)
    assert between > 1.8 * within and plain_between < 1.3 * plain_within  # the effect makes patients differ

    def lesion_share(difficulty):
        stacks = [s for s in plan(12, (16, 64, 64), seed=3, difficulty=difficulty) if s.label == "MALADE"]
        return np.mean([s.lesion_mask().mean() for s in stacks])
    assert lesion_share(1.0) < 0.5 * lesion_share(0.0)
    with pytest.raises(InputError, match="--prevalence"):
        plan(4, (16, 64, 64), prevalence=1.0)


def test_uint16_datasets_are_written_in_every_format_and_read_back_exactly(tmp_path):
    """A 16-bit dataset: Pillow has no 16-bit colour PNG, so its slice folders hold 16-bit RGB TIFFs."""
    labels = synth(tmp_path / "raw16", stacks=len(FORMATS), shape_zyx=SHAPE, seed=1, dtype="uint16", progress=False)
    items = {s.stack_id: s for s in plan(len(FORMATS), SHAPE, seed=1, dtype="uint16")}
    for row in rows(labels):
        src = open_source(labels.parent / row["path"])
        assert src.dtype == np.uint16
        np.testing.assert_array_equal(np.concatenate([s for _, s in src.slabs(5)], axis=1),
                                      items[row["stack_id"]].volume())
