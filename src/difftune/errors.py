"""Errors that are the user's to fix.

Every exception raised for bad input derives from :class:`UserError`; the CLI prints its
message (which names the file, row, column or flag at fault and what to do) without a
traceback and exits with status 2.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it."""


class ConfigError(UserError):
    """A flag or config-file value is missing, malformed or contradicts another."""


class DataError(UserError):
    """A data set, column, row or image cannot be used."""


class ModelLoadError(UserError):
    """A model folder or hub id cannot be loaded."""


class LaunchError(ConfigError):
    """The launch itself is wrong, the same way in every process it started: said once, by the first."""
