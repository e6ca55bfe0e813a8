"""Shared fixtures: small stores written straight from numpy arrays."""

from __future__ import annotations

import os

import pytest

from stacktrain.testing import tissue, write_array

os.environ.setdefault("OMP_NUM_THREADS", "1")  # two pytest workers share two cores


@pytest.fixture
def small_store(tmp_path):
    """Four 3-channel stacks (2 SAIN, 2 MALADE) of uneven sizes, LZ4, tiny chunks; returns (path, arrays)."""
    path = tmp_path / "small.zarr"
    arrays = {}
    shapes = [(20, 40, 48), (16, 32, 32), (24, 50, 36), (17, 33, 40)]
    for i, (z, y, x) in enumerate(shapes):
        sid = f"s{i}"
        arrays[sid] = tissue((3, z, y, x), seed=i)
        write_array(path, sid, arrays[sid], label="MALADE" if i % 2 else "SAIN", group=f"p{i // 2}")
    return path, arrays


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory):
    """24 tiny stacks (two per patient) and a 3-fold split of them, for the fake trainer's studies."""
    from tests.support import make_store
    return make_store(tmp_path_factory.mktemp("fake"))
