"""Shared fixtures: small stores written straight from numpy arrays."""

from __future__ import annotations

import os

import pytest

from stacktrain.testing import tissue, write_array

os.environ.setdefault("OMP_NUM_THREADS", "1")  # two pytest workers share two cores


SMALL_SHAPES = [(20, 40, 48), (16, 32, 32), (24, 50, 36), (17, 33, 40)]


def _write_small_store(path):
    """Four 3-channel stacks (2 SAIN, 2 MALADE, two patients) of uneven sizes, LZ4, tiny chunks."""
    arrays = {}
    for i, (z, y, x) in enumerate(SMALL_SHAPES):
        sid = f"s{i}"
        arrays[sid] = tissue((3, z, y, x), seed=i)
        write_array(path, sid, arrays[sid], label="MALADE" if i % 2 else "SAIN", group=f"p{i // 2}")
    return path, arrays


@pytest.fixture
def small_store(tmp_path):
    """The small store, fresh for a test that changes it; returns (path, arrays)."""
    return _write_small_store(tmp_path / "small.zarr")


@pytest.fixture(scope="session")
def shared_small_store(tmp_path_factory):
    """The same store written once per test process, for tests that only read it."""
    return _write_small_store(tmp_path_factory.mktemp("shared") / "small.zarr")


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory):
    """24 tiny stacks (two per patient) and a 3-fold split of them, for the fake trainer's studies."""
    from tests.support import make_store
    return make_store(tmp_path_factory.mktemp("fake"))
