"""Resume on a machine with fewer visible GPUs than the run was saved with: restore the RNG states of
the devices that exist, warn about the others (set_rng_state_all would crash)."""

from __future__ import annotations

import pytest
import torch

from stacktrain.train import checkpoint


@pytest.mark.parametrize("visible, restored", [(0, []), (1, [0]), (2, [0, 1])])
def test_rng_restore_only_for_devices_that_exist(monkeypatch, visible, restored):
    state = checkpoint.rng_state()
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: calls.append((int(s[0]), device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("would crash with fewer devices"))
    if visible < 2:
        with pytest.warns(UserWarning, match=f"RNG states of 2 CUDA device.*{visible} are visible"):
            checkpoint.set_rng_state(state)
    else:
        checkpoint.set_rng_state(state)
    assert calls == [(i, i) for i in restored]  # device i gets its own state
    assert torch.equal(torch.get_rng_state(), state["torch"])
