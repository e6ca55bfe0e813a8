"""The demo, reduced (fewer and smaller stacks, 2 epochs): every step runs and the table is printed.

The full demo's figures (wall time, stack-level scores against the trivial classifiers) are measured
by running `stacktrain demo` itself; see the README.
"""

from __future__ import annotations

import io

from rich.console import Console

from stacktrain.cli import build_parser
from stacktrain.train.demo import best_stack_f1, run_demo


def test_reduced_demo_prints_metrics_and_reruns_fresh(tmp_path):
    out = io.StringIO()
    console = Console(file=out, width=120)
    results = run_demo(tmp_path, epochs=2, stacks=8, shape_zyx=(16, 64, 64), console=console)
    text = out.getvalue()
    assert [e["epoch"] for e in results["epochs"]] == [0, 1] and results["stop_reason"] == "max_epochs"
    assert "validation metrics per epoch" in text and "stack-level F1 MALADE" in text
    best = results["best_epoch"]
    assert f"  {best} *" in text  # the best epoch is starred in the table
    assert f"{best_stack_f1(results):.3f}" in text
    assert str(tmp_path / "runs" / "demo" / "training_results.json") in text
    for name in ("raw/labels.csv", "store.zarr/zarr.json", "splits.json", "runs/demo/best.pt"):
        assert (tmp_path / name).exists(), name

    again = io.StringIO()
    rerun = run_demo(tmp_path, epochs=1, stacks=8, shape_zyx=(16, 64, 64), console=Console(file=again, width=120))
    assert len(rerun["epochs"]) == 1  # a fresh run, not the previous one continued or refused
    assert "0 converted, 8 skipped" in again.getvalue()  # same synthetic bytes: convert skips them


def test_cli_has_the_train_predict_and_demo_commands():
    parser = build_parser()
    args = parser.parse_args(["train", "cfg.toml", "--set", "train.epochs=3", "--set", "loader.batch_size=2",
                              "--run-dir", "r"])
    assert args.set == ["train.epochs=3", "loader.batch_size=2"] and str(args.run_dir) == "r"
    args = parser.parse_args(["predict", "best.pt", "s.zarr", "--out", "o", "--stacks", "a", "b"])
    assert args.stacks == ["a", "b"]
    assert str(parser.parse_args(["demo"]).out) == "demo-out"
