"""`stacktrain demo` (`make demo`): synth -> convert -> split -> train on the CPU -> metrics per epoch.

Everything is seeded: the same command prints the same metrics (timings aside). The work directory
holds raw/ (synthetic sources + labels.csv), store.zarr, splits.json and runs/demo (the run; replaced
on every demo). The sizes below were tuned so that the demo finishes in well under 3 minutes on 2
CPU cores and the tiny model learns the synthetic lesions (measured in the README).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from stacktrain import ui
from stacktrain.stores.convert import convert
from stacktrain.stores.options import ConvertOptions
from stacktrain.stores.synth import synth
from stacktrain.train.config import load_config
from stacktrain.train.loop import train
from stacktrain.train.results import RunResults, level_metrics, load_results
from stacktrain.train.split import make_splits, write_split

PRESET = Path(__file__).parent / "presets" / "demo.toml"
DEMO_STACKS = 20
DEMO_SHAPE_ZYX = (32, 96, 96)  # 18 patches of 16x32x32 per stack
VAL_FRACTION = 0.3
SEED = 0
# Harder than `stacktrain synth`'s defaults: stacks of a patient share staining, brightness and texture,
# and lesions are fainter, smaller and rarer, so one hand-made feature no longer separates the stacks
# (benchmarks/synth_baselines.py; the README gives the measured scores).
PATIENT_EFFECT = 2.0
DIFFICULTY = 0.2


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"  # two decimals: the table fits 80 columns


def metrics_table(results: dict[str, Any]) -> Table:
    """Per epoch: losses, then patch- and stack-level accuracy, F1 per class and ROC-AUC."""
    level = results["config"]["train"]["select_level"]
    table = Table(title="validation metrics per epoch (epochs count from 0, as in the JSON)", box=box.SIMPLE_HEAD,
                  padding=(0, 1), collapse_padding=True,
                  caption=f"S = SAIN, M = MALADE; * = best epoch (F1 M at {level} level)")
    table.add_column("epoch", justify="right")
    for name in ("train\nloss", "val\nloss"):
        table.add_column(name, justify="right")
    for level_name, style in (("patch", "cyan"), ("stack", "magenta")):
        for name in ("acc", "F1 S", "F1 M", "AUC"):
            table.add_column(f"{level_name}\n{name}", justify="right", style=style)
    for e in results["epochs"]:
        row = [f"{e['epoch']}{' *' if e['epoch'] == results['best_epoch'] else ''}",
               _fmt(e["train_loss"]), _fmt(e["val_loss"])]
        for level in ("patch", "stack"):
            m = level_metrics(e, level)
            row += [_fmt(m["accuracy"]), _fmt(m["f1"]["SAIN"]), _fmt(m["f1"]["MALADE"]), _fmt(m["roc_auc"])]
        table.add_row(*row)
    return table


def best_stack_f1(results: RunResults) -> float:
    """Stack-level validation F1 of MALADE at the best epoch."""
    return results.metrics("stack")["f1"]["MALADE"]


def prepare_data(out: str | Path, *, stacks: int = DEMO_STACKS, shape_zyx=DEMO_SHAPE_ZYX,
                 patch_zyx=(16, 32, 32), val_fraction: float = VAL_FRACTION, seed: int = SEED,
                 patient_effect: float = PATIENT_EFFECT, difficulty: float = DIFFICULTY,
                 console: Console | None = None) -> tuple[Path, Path]:
    """synth -> convert -> split under `out` (raw/, store.zarr, splits.json); returns (store, splits).
    Silent without a console. Reruns reuse the store: convert skips the unchanged stacks."""

    out = Path(out)
    store, splits = out / "store.zarr", out / "splits.json"
    say = console.rule if console is not None else (lambda *_: None)
    bar = console is not None and console.is_terminal
    say(f"1/4 synth: {stacks} stacks of {'x'.join(map(str, shape_zyx))} voxels, 3 channels")
    labels = synth(out / "raw", stacks=stacks, shape_zyx=shape_zyx, seed=seed, patient_effect=patient_effect,
                   difficulty=difficulty, progress=bar)
    say("2/4 convert to a Zarr store (LZ4 chunks)")
    report = convert(labels, store, ConvertOptions(min_patch_zyx=tuple(patch_zyx)),
                     progress=ui.ConvertBar(console, bar=bar) if console is not None else None)
    say(f"3/4 split by patient (val fraction {val_fraction}, seed {seed})")
    split = make_splits(store, val_fraction=val_fraction, seed=seed)
    write_split(split, splits)
    if console is not None:
        fold = split["folds"][0]
        console.print(f"{report.summary()}\n{len(fold['train'])} train stacks, {len(fold['val'])} val "
                      f"stacks -> {splits}", highlight=False)
    return store, splits


def run_demo(out: str | Path = "demo-out", *, epochs: int | None = None, stacks: int = DEMO_STACKS,
             shape_zyx: tuple[int, int, int] = DEMO_SHAPE_ZYX, overrides: list[str] = (),
             console: Console | None = None) -> dict[str, Any]:
    """Run the whole demo in `out`; return the results dict (the table is printed on `console`)."""

    console = console or ui.console()
    out = Path(out)
    t0 = time.perf_counter()
    store, splits, run_dir = out / "store.zarr", out / "splits.json", out / "runs" / "demo"
    extra = [*([f"train.epochs={epochs}"] if epochs is not None else []), *overrides]
    cfg = load_config(PRESET, [f"data.store={store}", f"data.split={splits}", f"train.out_dir={out / 'runs'}",
                               "train.run_name=demo", *extra])
    prepare_data(out, stacks=stacks, shape_zyx=shape_zyx, patch_zyx=cfg.patch.size, console=console)
    console.rule(f"4/4 train {cfg.model.name} (tiny) on {cfg.loader.loader}, {cfg.train.epochs} epochs at most")
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's run is always a fresh one
    results = load_results(train(cfg, run_dir=run_dir))

    console.print(metrics_table(results))
    f1 = best_stack_f1(results)
    n_val = len(results["epochs"][0]["volumes"])
    console.print(f"best epoch {results['best_epoch']} (stop: {results['stop_reason']}): stack-level F1 MALADE "
                  f"{f1:.3f} on {n_val} validation stacks; demo took {time.perf_counter() - t0:.0f} s",
                  highlight=False)
    console.print(f"results: {run_dir / 'training_results.json'}  (checkpoints: {run_dir}/best.pt, last.pt; "
                  f"curves: tensorboard --logdir {run_dir / 'tensorboard'})", highlight=False, soft_wrap=True)
    return results
