"""Typed errors: each message names the file or key at fault and says what to do."""


class StackTrainError(Exception):
    """Base of every error the CLI turns into one clear line and a non-zero exit."""


class StoreError(StackTrainError, ValueError):
    """A store cannot be opened or read as asked."""


class InputError(StackTrainError, ValueError):
    """A raw input (file, manifest row, option) cannot be converted."""
