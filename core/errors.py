"""Every error stacktrain raises on purpose: each message names the file, key or stack at fault and says
what to do. The command line prints any `StackTrainError` as one line and exits with 2; anything else is
a bug."""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "StackTrainError", "ConfigError", "InputError", "ConversionFailed", "StoreError", "StoreDamaged", "PipelineError",
    "BatchContractError", "ModelError", "SplitError", "EvalError", "ResultsError", "CheckpointError",
    "StudyError", "DiskFullError", "RunBusyError", "user_message",
]


class StackTrainError(Exception):
    """Base of every error the CLI turns into one clear line and exit code 2."""


class ConfigError(StackTrainError, ValueError):
    """A file the user wrote (run config, study file, options) has a bad key or value; names it and
    lists what is allowed."""


class InputError(StackTrainError, ValueError):
    """A raw input (file, manifest row, option) cannot be converted."""


class ConversionFailed(InputError):
    """Some stacks could not be converted; the others are in the store. `.report` has the details."""

    def __init__(self, message: str, report: Any):
        super().__init__(message)
        self.report = report


class StoreError(StackTrainError, ValueError):
    """A store cannot be opened or read as asked."""


class StoreDamaged(StoreError):
    """A stack's files disagree with what its conversion recorded (missing, truncated, extra, a bad
    checksum, a chunk that does not decode); `stacktrain verify` reports them all."""


class PipelineError(StackTrainError, ValueError):
    """Patches or loaders cannot be built as configured."""


class BatchContractError(StackTrainError, TypeError):
    """A loader delivered something other than the documented batch."""


class ModelError(ConfigError):
    """An unknown model name or builder option."""


class SplitError(StackTrainError, ValueError):
    """A split file is unreadable, or leaks a stack or patient between parts."""


class EvalError(StackTrainError, ValueError):
    """The validation predictions cannot be evaluated (empty, duplicated or inconsistent)."""


class ResultsError(StackTrainError, ValueError):
    """A results file is missing, unreadable or not shaped as the results schema says."""


class CheckpointError(StackTrainError, ValueError):
    """A checkpoint is missing, unreadable, or belongs to another model."""


class StudyError(StackTrainError, ValueError):
    """A study file, or a study directory, is not usable as it stands; the message says why and how."""


_RAISED_LINE = re.compile(r"^(?:stacktrain\.errors\.)?([A-Za-z]+): (.+)$")


def _raised_line(text: str) -> str | None:
    """The message of the last `stacktrain.errors.X: message` line of a traceback quoted in `text`."""
    for line in reversed(text.splitlines()):
        m = _RAISED_LINE.match(line.strip())
        if m and isinstance(globals().get(m[1]), type) and issubclass(globals()[m[1]], StackTrainError):
            return m[2]
    return None


def user_message(error: BaseException) -> str | None:
    """The one line of the StackTrainError behind `error`, or None when there is none (a bug).

    Loader workers hand errors back wrapped: torch's DataLoader re-raises the same class with the
    worker's whole traceback as its message; DALI's parallel external source raises a plain Exception
    quoting the traceback, from the original. Either way the user gets the original line."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if isinstance(e, StackTrainError):
            if "\n" not in text.strip():
                return text
            return _raised_line(text) or text.strip().splitlines()[0]
        if line := _raised_line(text):
            return line
        e = e.__cause__ or e.__context__
    return None


class DiskFullError(StackTrainError, OSError):
    """A write ran out of disk space (ENOSPC) or quota (EDQUOT); names the file, the bytes it needed and the
    bytes free. The file written before, if any, is unchanged."""


class RunBusyError(StackTrainError, RuntimeError):
    """Another process holds the run (or study) directory: two trainings never write into one."""
