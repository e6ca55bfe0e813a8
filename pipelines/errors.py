"""Errors of the patch pipelines: each names the stack, option or value at fault and the fix."""

from stores.errors import StackTrainError


class PipelineError(StackTrainError, ValueError):
    """Patches or loaders cannot be built as configured."""
