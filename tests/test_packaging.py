"""The installed distribution: one top-level import name, packaged presets reachable by name, and no
confusion with a user's own `train.py` or `benchmarks/` in the working folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("core", "stores", "pipelines", "train", "benchmarks", "pyproject.toml", "README.md")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, built from a copy of the sources (nothing written into the checkout), unpacked as
    site-packages would hold it."""
    src, site = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("site")
    for name in SOURCES:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, src / name)
    for junk in src.rglob("__pycache__"):
        shutil.rmtree(junk)
    wheels = tmp_path_factory.mktemp("wheels")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(wheels), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("stacktrain-*.whl")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
        names = z.namelist()
    return site, names


def run(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_one_top_level_package_with_presets(installed):
    site, names = installed
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"stacktrain"}
    for preset in ("stacktrain/train/presets/demo.toml", "stacktrain/train/presets/seed-gpu.toml",
                   "stacktrain/train/study/presets/example-cpu.toml"):
        assert preset in names


def test_generic_names_are_not_installed(installed, tmp_path):
    site, _ = installed
    for name in ("train", "stores", "pipelines", "benchmarks"):
        proc = run(site, tmp_path, "-c", f"import {name}")
        assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr, name
    proc = run(site, tmp_path, "-c", "import stacktrain; print(stacktrain.__file__)")
    assert proc.stdout.strip().startswith(str(site))


def test_a_users_train_py_and_benchmarks_folder_change_nothing(installed, tmp_path):
    site, _ = installed
    (tmp_path / "train.py").write_text("raise SystemExit('the user train.py was imported')\n")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("raise SystemExit('the user benchmarks was imported')\n")
    proc = run(site, tmp_path, "-m", "stacktrain", "train", "demo")  # the packaged preset, by name
    assert proc.returncode == 2 and "demo-out/store.zarr: store not found" in proc.stderr, proc.stderr
    proc = run(site, tmp_path, "-m", "stacktrain", "train", "preset:nope")
    assert proc.returncode == 2 and "presets: demo, seed-gpu" in proc.stderr, proc.stderr
    proc = run(site, tmp_path, "-m", "stacktrain", "study", "example-cpu", "--out", "o")
    assert proc.returncode == 2 and "example-out/splits.json" in proc.stderr, proc.stderr
    proc = run(site, tmp_path, "-m", "stacktrain.bench.gpu_check", "--help")
    assert proc.returncode == 0 and "--out" in proc.stdout
