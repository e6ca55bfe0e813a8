"""The one command line: its subcommands and options are pinned here, so a change to them is a
decision; `--version`, a closed pipe, and `--json` behave the same everywhere."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from stacktrain import __version__
from stacktrain.cli import build_parser, main

COMMANDS = {
    "synth": (["out_dir"], ["--difficulty", "--dtype", "--patient-effect", "--prevalence", "--seed", "--shape",
                            "--stacks"]),
    "convert": (["manifest"], ["--allow-gaps", "--allow-unlabeled", "--axes", "--chunk", "--codec", "--dtype",
                               "--foreground-threshold", "--label-map", "--levels", "--min-patch", "--no-progress",
                               "--out", "--overwrite", "--pad", "--part", "--replicate-channels", "--scale",
                               "--shard", "--stacks-from", "--window", "--workers"]),
    "info": (["store"], ["--json"]),
    "export": (["store"], ["--codec", "--out"]),
    "relabel": (["store", "stack_id", "label"], ["--group"]),
    "remove": (["store", "stack_ids"], []),
    "verify": (["store"], ["--deep"]),
    "split": (["store"], ["--allow-one-class", "--folds", "--out", "--seed", "--test-fraction", "--val-fraction"]),
    "train": (["config"], ["--force", "--resume", "--run-dir", "--set"]),
    "predict": (["checkpoint", "inputs"], ["--axes", "--batch-size", "--device", "--loader", "--out",
                                           "--replicate-channels", "--stacks", "--store", "--workers"]),
    "demo": ([], ["--epochs", "--out"]),
    "study": (["study"], ["--final", "--out", "--print-runs", "--set", "--storage", "--trials", "--workers"]),
    "report": (["study_dir"], ["--level", "--no-plots", "--resamples", "--seed", "--storage"]),
    "bench": ([], []),
    "bench loader": ([], ["--batch", "--cache", "--dtype", "--json", "--loaders", "--patch", "--prefetch", "--profile",
                          "--quiet", "--record", "--seed", "--segments", "--shape", "--stacks", "--store", "--warmup",
                          "--workers"]),
    "bench store": ([], ["--cache", "--codecs", "--json", "--layouts", "--patch", "--patches", "--quiet", "--record",
                         "--seed", "--segments", "--shape", "--warmup"]),
    "bench convert": ([], ["--cache", "--formats", "--json", "--quiet", "--record", "--seed", "--segments", "--shape",
                           "--stacks", "--warmup", "--workers"]),
    "bench model": ([], ["--batch", "--cache", "--channels-last", "--json", "--models", "--patch", "--peak-tflops",
                         "--precision", "--quiet", "--record", "--seed", "--segments", "--steps", "--tiny",
                         "--warmup"]),
    "bench train": ([], ["--batch", "--cache", "--json", "--loader", "--model", "--no-tiny", "--patch", "--precision",
                         "--quiet", "--record", "--seed", "--segments", "--shape", "--stacks", "--steps", "--store",
                         "--stride", "--tiny", "--warmup", "--workers"]),
}


def _walk(parser: argparse.ArgumentParser, prefix: str = "") -> dict:
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(_walk(sub, f"{prefix}{name} "))
    if prefix:
        positional = [a.dest for a in parser._actions
                      if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
        flags = sorted(o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help"))
        out[prefix.strip()] = (positional, flags)
    return out


def test_subcommands_and_options_are_pinned():
    assert _walk(build_parser()) == COMMANDS


def test_convert_flags_take_defaults_and_choices_from_the_options_dataclass():
    from stacktrain.stores.options import ConvertOptions
    args = build_parser().parse_args(["convert", "m.csv", "--out", "s.zarr"])
    defaults = ConvertOptions()
    assert all(getattr(args, f) == getattr(defaults, f) for f in ("codec", "workers", "chunk_zyx", "scale", "pad",
                                                                  "dtype", "window"))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "m.csv", "--out", "s.zarr", "--codec", "gzip"])
    args = build_parser().parse_args(["convert", "m.csv", "--out", "s.zarr", "--dtype", "uint8", "--window", "-1024",
                                      "p99.5"])
    assert (args.dtype, args.window) == ("uint8", ["-1024", "p99.5"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "m.csv", "--out", "s.zarr", "--dtype", "int16"])


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"stacktrain {__version__}"


def test_python_m_stacktrain_is_the_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stacktrain", "--version"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"stacktrain {__version__}"


def test_info_json_to_stdout_a_file_and_a_closed_pipe(small_store, tmp_path, capsys):
    path, arrays = small_store
    assert main(["info", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [s["stack_id"] for s in printed["stacks"]] == sorted(arrays)
    assert main(["info", str(path), "--json", str(tmp_path / "info.json")]) == 0
    assert json.loads((tmp_path / "info.json").read_text()) == printed
    # `stacktrain info --json | head -c 10`: the reader leaves early; no traceback, SIGPIPE's exit code
    proc = subprocess.run(f"{sys.executable} -m stacktrain info {path} --json | head -c 10", shell=True,
                          capture_output=True, text=True, timeout=120)
    assert len(proc.stdout) == 10 and "Traceback" not in proc.stderr and "Error" not in proc.stderr


def test_a_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope.zarr")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "nope.zarr" in err and "Traceback" not in err
