"""User-facing data errors: a problem in the user's files (not a bug in the suite).

``train.py`` turns these (and ``runtime.ConfigError``) into one line on stderr and exit status 2; anything else is a
bug and keeps its traceback. Messages name the file (and line or key) so the user can fix it without reading code.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad content in a user's data file: wrong columns, unknown label ids, malformed rows, unreadable shards."""


class DataFileNotFound(DataError, FileNotFoundError):
    """A dataset root, annotation file or sidecar that the config points at does not exist."""
