"""Benchmark (not a timed test) of training_results.json at scale: append N epochs of S samples.

    python -m stacktrain.bench.results_bench [--epochs 100] [--stacks 200] [--patches 60] [--out DIR]
                                             [--report-runs 45]

Each epoch has the seed's full content (samples, volumes, metrics at both levels). Prints the write
time of every 10th epoch, the median and the maximum, the file size, the peak RSS of the writer,
then the time and peak RSS of `load_results(path, samples="best")` (what a report does per run) in
a fresh process. With --report-runs N, a phase-1-sized study directory of N runs (9 variants x 5
folds for 45; every run a hard link to the written file) is reported with `stacktrain report` in a
fresh process, whose wall time and peak RSS are printed. Goals (issue 11): <= 0.2 s per epoch at 100
epochs of 12,000 samples, and a 45-run report <= 2 GB RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from stacktrain.train.config import TrainConfig, config_to_dict
from stacktrain.train.evaluator import binary_metrics
from stacktrain.train.results import RESULTS_NAME, new_results, now
from stacktrain.train.results_io import ResultsWriter


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def epoch(number: int, stacks: int, patches: int, rng: np.random.Generator) -> dict:
    labels = np.arange(stacks) % 2
    prob = np.clip(rng.normal(0.3 + 0.4 * np.repeat(labels, patches), 0.2), 0, 1)
    samples = [{"stack_id": f"stack{s:04d}", "position": [0, 32 * (j // 8), 32 * (j % 8)],
                "probability": float(prob[s * patches + j]), "label": int(labels[s])}
               for s in range(stacks) for j in range(patches)]
    agg = prob.reshape(stacks, patches).mean(1)
    volumes = [{"stack_id": f"stack{s:04d}", "aggregated_probability": float(agg[s]),
                "predicted_label": int(agg[s] >= 0.5), "label": int(labels[s]), "n_patches": patches}
               for s in range(stacks)]
    return {"epoch": number, "train_loss": 0.5, "val_loss": 0.6, "lr": 1e-3, "wall_s": 1.0,
            "throughput": {"train_patches_per_s": 100.0, "data_wait_pct": 1.0},
            "patch_metrics": binary_metrics(np.repeat(labels, patches), prob),
            "volume_metrics": binary_metrics(labels, agg), "samples": samples, "volumes": volumes}


# The reader's peak RSS is VmHWM of its own address space (ru_maxrss would carry the parent's over exec).
READER = """
import json, sys, time
from stacktrain.train.results import load_results
t = time.perf_counter()
r = load_results(sys.argv[1], samples="best")
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"load_s": time.perf_counter() - t, "best_samples": len(r.best["samples"]),
                  "load_peak_rss_mib": hwm / 1024}))
"""


def run(epochs: int, stacks: int, patches: int, out: Path) -> dict:
    rng = np.random.default_rng(0)
    path = out / RESULTS_NAME
    writer = ResultsWriter(path, new_results(config_to_dict(TrainConfig()), {"device": "bench"}))
    times = []
    for e in range(epochs):
        entry = epoch(e, stacks, patches, rng)  # built outside the timing: the evaluator's work
        t0 = time.perf_counter()
        writer.append(entry, best_epoch=e // 2, stop_reason="max_epochs" if e == epochs - 1 else None,
                      updated_at=now())
        times.append(time.perf_counter() - t0)
        if e % 10 == 9 or e == 0:
            print(f"epoch {e + 1:4d}: write {times[-1]:.3f} s, file {path.stat().st_size / 1e6:.0f} MB", flush=True)
    result = {"epochs": epochs, "samples_per_epoch": stacks * patches, "median_write_s": statistics.median(times),
              "max_write_s": max(times), "file_mb": path.stat().st_size / 1e6, "writer_peak_rss_mib": peak_rss_mib()}
    reader = subprocess.run([sys.executable, "-c", READER, str(path)], capture_output=True, text=True, check=True)
    result.update(json.loads(reader.stdout))
    t0 = time.perf_counter()
    with open(path) as f:
        json.load(f)  # any JSON reader opens it (the whole file, every sample: slow and large, on purpose)
    result["json_load_s"] = time.perf_counter() - t0
    return result


REPORT = """
import json, sys, time
from rich.console import Console
from stacktrain.train.study.report import report
t = time.perf_counter()
report(sys.argv[1], plots=False, console=Console(quiet=True))
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"report_s": time.perf_counter() - t, "report_peak_rss_mib": hwm / 1024}))
"""


def report_study(results: Path, runs: int, out: Path) -> dict:
    """A grid study directory of `runs` runs (variants x 5 folds), each run's results a hard link."""
    import os
    variants = [f"v{i}" for i in range((runs + 4) // 5)]
    config = json.loads(results.open().readline()[:-len(',"epochs":[\n')] + "}")["config"]
    config["train"]["select_level"] = "stack"
    (out / "study").mkdir()
    manifest = {"format_version": 1, "name": "bench", "kind": "grid", "baseline": variants[0], "variants": variants,
                "models": ["m"], "folds": list(range(5)), "split_sha256": "bench", "chain": []}
    (out / "study/study.json").write_text(json.dumps(manifest))
    for n in range(runs):
        run = out / f"study/runs/{variants[n // 5]}--m--fold{n % 5}"
        run.mkdir(parents=True)
        os.link(results, run / RESULTS_NAME)
        (run / "study_run.json").write_text(json.dumps({"label": variants[n // 5], "variant": variants[n // 5],
                                                        "model": "m", "fold": n % 5, "seed": None, "trial": None,
                                                        "config": config}))
    done = subprocess.run([sys.executable, "-c", REPORT, str(out / "study")], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--stacks", type=int, default=200)
    ap.add_argument("--patches", type=int, default=60)
    ap.add_argument("--out", type=Path, default=None, help="directory for the file (default: a temporary one)")
    ap.add_argument("--report-runs", type=int, default=0, help="also report a study of this many runs (e.g. 45)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(a.epochs, a.stacks, a.patches, a.out or Path(tmp))
        if a.report_runs:
            result.update(report_study((a.out or Path(tmp)) / RESULTS_NAME, a.report_runs, a.out or Path(tmp)))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
