"""Every closed set of choices a user can name, as `Literal` types: config dataclasses annotate their
fields with them, the config loader checks values against them, and the command line derives its
`choices=` from them with `options(...)`. One list each, nowhere else."""

from __future__ import annotations

import typing
from typing import Literal

Label = Literal["SAIN", "MALADE"]
Codec = Literal["lz4", "zstd"]
Scale = Literal["none", "minmax", "clip"]
StoredDtype = Literal["uint8", "uint16"]
TargetDtype = Literal["keep", "uint8", "uint16"]  # convert --dtype: keep the sources' (when they agree)
LoaderKind = Literal["auto", "dali", "dali-cpu", "torch"]
EdgePolicy = Literal["fit", "drop", "pad"]
Normalization = Literal["scale", "meanstd", "percentile"]
OutDtype = Literal["bf16", "fp16", "fp32"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Device = Literal["auto", "cpu", "cuda"]
Level = Literal["patch", "stack"]
Aggregate = Literal["mean", "max", "topk"]
Sampling = Literal["patch", "per-stack"]  # what weighs the same in a training epoch
ThresholdRule = Literal["fixed", "tuned"]  # a stack is MALADE from 0.5, or from the validation-tuned value
Pruner = Literal["median", "none"]
SpaceKind = Literal["float", "int", "categorical"]  # an [hpo.space] dimension
StopReason = Literal["early_stopping", "max_epochs", "pruned"]


def options(choice: object) -> tuple[str, ...]:
    """The allowed values of a Literal type, in order: `options(Codec) == ("lz4", "zstd")`."""
    return typing.get_args(choice)
