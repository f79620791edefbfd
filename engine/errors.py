"""Every error the engine raises.

Each class derives from :class:`DeltaError` *and* from the builtin that fits, so callers can catch
either. Messages say what was expected, what was found, and how to fix it.
"""

from __future__ import annotations


class DeltaError(Exception):
    """Base class of every error raised by the engine."""


class BackboneError(DeltaError):
    """A backbone source could not be loaded."""


class UnknownBackboneError(BackboneError, ValueError):
    """The source names no catalog entry, architecture or source kind that exists."""


class BackboneNotFoundError(BackboneError, FileNotFoundError):
    """A local backbone directory (or a file it needs) does not exist."""


class PickleRefusedError(BackboneError, ValueError):
    """Only pickled weights (``*.bin``) were found and pickle loading was not allowed."""


class AddressingError(DeltaError, ValueError):
    """An addressing expression is malformed or cannot be satisfied."""


class InvalidExpressionError(AddressingError):
    """An expression is empty, or its ``[r]`` regex is invalid or not linear-time."""


class NoMatchError(AddressingError):
    """An expression matched no module. Never a silent partial match."""

    def __init__(self, message: str, expression: str, suggestions: list[str]) -> None:
        super().__init__(message)
        self.expression = expression
        self.suggestions = suggestions


class UnknownPathError(AddressingError, KeyError):
    """A dotted module path that is not in the model was given as a selection."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class ConfigError(DeltaError, ValueError):
    """A delta configuration or hyper-parameter is invalid."""


class DeltaStateError(DeltaError, RuntimeError):
    """An operation does not fit the delta's current state (e.g. attach twice)."""


class CheckpointError(DeltaError, ValueError):
    """A delta checkpoint is corrupt or does not fit the backbone."""


class ModuleNotSupportedError(DeltaError, TypeError):
    """A delta method was asked to wrap a module type it cannot handle."""
