"""`stacktrain train`, `stacktrain predict`, `stacktrain demo`: argument parsing only, work elsewhere.

Heavy imports (torch, DALI) happen inside the command functions so that `stacktrain --help` is fast.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def train_command(args: argparse.Namespace) -> int:
    from train.config import ConfigError, load_config, resolve_run_dir
    from train.loop import CONFIG_NAME, train

    config = args.config
    if config is None and args.resume is not None:
        config = Path(args.resume) / CONFIG_NAME  # the resolved config the run saved
    if config is None:
        raise ConfigError("give a CONFIG.toml (presets are in train/presets/) or --resume RUN_DIR")
    cfg = load_config(config, args.set or [])
    run_dir = Path(args.resume or args.run_dir or resolve_run_dir(cfg))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (args.resume or args.run_dir or cfg.train.run_name):
        from train.runtime import setup_runtime  # ranks may disagree on a timestamp: take rank 0's
        run_dir = Path(setup_runtime(cfg.train.device).broadcast(str(run_dir)))
    train(cfg, run_dir=run_dir, resume=args.resume is not None)
    return 0


def predict_command(args: argparse.Namespace) -> int:
    from train.predict import predict

    predict(args.checkpoint, args.store, args.out, stacks=args.stacks, loader=args.loader,
            device=args.device, batch_size=args.batch_size)
    return 0


def demo_command(args: argparse.Namespace) -> int:
    from train.demo import run_demo

    run_demo(args.out, epochs=args.epochs)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model on a store's split (one process, or one rank per GPU under torchrun)",
        description="Train as CONFIG.toml says (presets: train/presets/). Writes RUN_DIR/config.toml, "
                    "training_results.json (rewritten after every epoch), last.pt, best.pt and tensorboard/. "
                    "Under `torchrun --nproc_per_node=N` each rank trains on its share of every batch.")
    p.add_argument("config", nargs="?", type=Path, metavar="CONFIG.toml",
                   help="the config (optional with --resume: the run's saved config.toml)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=5 (repeatable)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    p.add_argument("--run-dir", type=Path, metavar="DIR",
                   help="run directory (default: train.out_dir / train.run_name, or <model>-<time>)")
    p.set_defaults(func=train_command)

    p = subparsers.add_parser(
        "predict", help="predict patches and stacks of a store with a checkpoint; CSV, JSON, heatmaps",
        description="Run a checkpoint over every patch of the stacks (all by default) and write "
                    "DIR/patches.csv, DIR/stacks.csv, DIR/predictions.json and DIR/heatmaps/<stack>.png.")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="best.pt or last.pt of a run")
    p.add_argument("store", type=Path, metavar="STORE.zarr")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--stacks", nargs="+", metavar="ID", help="stack ids to predict (default: all)")
    p.add_argument("--loader", default="auto", choices=("auto", "dali", "dali-cpu", "torch"),
                   help="loader (default auto: dali on a GPU, else dali-cpu)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's loader.batch_size")
    p.set_defaults(func=predict_command)

    p = subparsers.add_parser(
        "demo", help="synth -> convert -> split -> train a tiny model on the CPU, print the metrics",
        description="The embedded demo (`make demo`): synthetic stacks, a store, a split, and a few minutes "
                    "of CPU training with the `demo` preset; prints patch- and stack-level metrics per epoch.")
    p.add_argument("--out", type=Path, default=Path("demo-out"), metavar="DIR",
                   help="work directory (default demo-out)")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.set_defaults(func=demo_command)
