"""The two kinds of failure a user can meet, and the exit status each maps to.

Pure: no imports beyond the standard library, so every layer (recipe reading,
planning, the run engine, the CLI) can raise them without import cycles.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A problem with what the user gave (recipe, paths, flags), explained in one
    paragraph before anything is written. The CLI exits with status 2."""

    exit_code = 2


class MergeError(RuntimeError):
    """The merge itself failed after it started (a corrupt tensor, out of disk,
    a killed worker). The CLI exits with status 1."""

    exit_code = 1
