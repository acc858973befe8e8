"""Errors that reach the user as one line, never as a traceback.

The CLI catches :class:`FedrecError` and prints ``str(err)`` alone (exit code 2); anything else
is a bug: one ``internal error`` line and exit code 4, its traceback only with ``-vv``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ConfigError", "DataError", "FedrecError"]


class FedrecError(Exception):
    """Base class for errors caused by the user's input or environment, shown as one line."""


class DataError(FedrecError, ValueError):
    """A data file cannot be read or does not have the expected shape.

    Parameters
    ----------
    message:
        What is wrong, in the user's terms.
    path:
        The file concerned, if any.
    line:
        The 1-based line number in ``path``, if the problem is on one line.
    """

    def __init__(self, message: str, *, path: Path | str | None = None, line: int | None = None):
        self.message = message
        self.path = None if path is None else Path(path)
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(f"{where}{message}")


class ConfigError(FedrecError, ValueError):
    """A configuration value or ``--set`` override is unknown or out of range.

    Parameters
    ----------
    message:
        What is wrong, in the user's terms (it names the key).
    key:
        The dotted config key concerned (``server.lr``, ``model.dims[0]``), if one is; what
        :func:`common.config.load_config` uses to say which file line or ``--set`` gave it.
    """

    def __init__(self, message: str, *, key: str | None = None):
        self.message = message
        self.key = key
        super().__init__(message)
