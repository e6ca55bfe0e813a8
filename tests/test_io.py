"""Writes that matter: atomic, and readable by the group as `open()` would make them."""

from __future__ import annotations

import os
import stat

import pytest

from stacktrain.errors import ConfigError
from stacktrain.io import atomic_write_json, atomic_write_text, read_json, read_toml


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "b.txt", "w") as f:  # what a plain open() gives, for comparison
            f.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == mode


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "r.json", {"a": object()})
    assert read_json(tmp_path / "r.json") == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_readers_name_the_file_and_the_problem(tmp_path):
    (tmp_path / "bad.toml").write_text("x = = 1")
    with pytest.raises(ConfigError, match="bad.toml: config is not valid TOML"):
        read_toml(tmp_path / "bad.toml", "config")
    with pytest.raises(ConfigError, match="missing.json: results not found"):
        read_json(tmp_path / "missing.json", "results")
    with pytest.raises(ConfigError, match="is a folder"):
        read_toml(tmp_path, "config")
