"""Kill -9 a training subprocess during its second epoch, resume it: same results as one clean run.

The clean run happens in this process, the killed one in a fresh interpreter: their equality also
shows that a rerun of the same config reproduces the results (apart from timing fields).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stacktrain.cli import main
from stacktrain.train.checkpoint import LAST, load_checkpoint
from stacktrain.train.config import save_config
from stacktrain.train.loop import train
from stacktrain.train.results import RESULTS_NAME, load_results, strip_timing
from tests.support import tiny_config, tiny_data

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_data(tmp_path_factory.mktemp("data"))


def test_kill_and_resume_equals_an_uninterrupted_run(data, tmp_path):
    cfg = tiny_config(*data, "train.epochs=2")
    config_path = tmp_path / "config.toml"
    save_config(cfg, config_path)
    run_dir = tmp_path / "killed"
    # Same torch thread count as this process: CPU kernels then add in the same order.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "stacktrain.cli", "train", str(config_path), "--run-dir",
                             str(run_dir)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:  # blocks until the child logs: no polling, no sleeps
            seen.append(line)
            if line.startswith("epoch 0 (1/2) |"):  # logged once epoch 0's results and last.pt are written
                proc.send_signal(signal.SIGKILL)  # it is now in epoch 1
                break
        else:
            pytest.fail("training ended before its first epoch line:\n" + "".join(seen))
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(run_dir / LAST)["epoch"] == 0
    partial = json.loads((run_dir / RESULTS_NAME).read_text())  # complete JSON: written atomically
    assert [e["epoch"] for e in partial["epochs"]] == [0] and partial["stop_reason"] is None

    assert main(["train", "--resume", str(run_dir)]) == 0  # the run's own config.toml
    resumed = load_results(run_dir / RESULTS_NAME)
    clean = load_results(train(cfg, run_dir=tmp_path / "clean"))
    assert [e["epoch"] for e in resumed["epochs"]] == [0, 1] and resumed["stop_reason"] == "max_epochs"
    assert strip_timing(resumed) == strip_timing(clean)
    assert load_checkpoint(run_dir / LAST)["epoch"] == 1
