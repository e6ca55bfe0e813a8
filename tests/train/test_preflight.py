"""Preflight: every device/precision/loader problem of a config at once, and the memory estimate."""

from __future__ import annotations

import pytest
import torch

from stacktrain.errors import ConfigError
from stacktrain.train.config import load_config
from stacktrain.train.preflight import activation_bytes_per_patch, machine_problems, memory_problem, preflight


def test_the_gpu_preset_on_a_cpu_machine_lists_every_key_at_once():
    cfg = load_config("seed-gpu", ["train.precision=bf16"])
    problems = machine_problems(cfg, has_cuda=False, has_dali=True)
    assert [p.split(" =")[0] for p in problems] == ["train.device", "train.precision", "loader.loader"]
    with pytest.raises(ConfigError, match=r"\(3 problem\(s\)\): train.device .*; train.precision .*; loader.loader"):
        preflight(cfg)
    assert machine_problems(cfg, has_cuda=True, has_dali=True) == []
    no_dali = load_config("seed-gpu", ["train.device=cpu", "train.precision=fp32", "loader.loader=dali-cpu"])
    assert machine_problems(no_dali, has_cuda=False, has_dali=False) == [
        'loader.loader = "dali-cpu" needs NVIDIA DALI, which does not import here: set "torch"']


def test_a_batch_that_does_not_fit_is_refused_with_the_batch_that_does():
    cfg = load_config("demo", ["loader.batch_size=64"])
    per_patch, params = activation_bytes_per_patch(cfg, torch.float32)
    need = 64 * per_patch + 16 * params
    assert memory_problem(cfg, on_gpu=False, available=2 * need) is None
    small = need // 2  # half of what batch 64 needs
    text = memory_problem(cfg, on_gpu=False, available=small)
    assert "at batch 64" in text and "--force" in text
    fits = int(text.split("set loader.batch_size = ")[1].split(",")[0])
    assert 1 <= fits < 64
    at = lambda batch: memory_problem(load_config("demo", [f"loader.batch_size={batch}"]), on_gpu=False,  # noqa: E731
                                      available=small)
    assert at(fits) is None and at(fits + 1) is not None  # the largest batch that fits


def test_force_starts_anyway(monkeypatch):
    import stacktrain.train.preflight as pf
    monkeypatch.setattr(pf, "available_memory", lambda: 1)  # nothing fits
    with pytest.raises(ConfigError, match="needs about"):
        preflight(load_config("demo", ["train.device=cpu"]))
    preflight(load_config("demo", ["train.device=cpu", "train.memory_check=false"]))  # no error
