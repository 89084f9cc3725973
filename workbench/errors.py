"""The error hierarchy: every message states the rule, the offending value and what would be valid.

`WorkbenchError` is the root; the CLI turns any of them into one clear line (no traceback soup).
Each subclass also derives from the built-in exception a caller would expect (ValueError, OSError).
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Root of every error workbench raises on purpose."""


class ConfigError(WorkbenchError, ValueError):
    """The study file breaks a rule: syntax, unknown key, wrong type, bad range, unknown model."""


class DataError(WorkbenchError, ValueError):
    """The data cannot be read or does not fit the study: missing path, bad IDX file, bad image."""


class SpaceError(WorkbenchError, OSError):
    """What the study would write or hold does not fit: the disk of the output folder, or memory.
    The message gives the size, the space free and what to change."""


class CheckpointError(WorkbenchError, OSError):
    """A checkpoint or out-of-fold file is missing, truncated or corrupt."""


class TrainingError(WorkbenchError, RuntimeError):
    """A trial cannot train as configured on this machine (a CUDA out-of-memory error)."""


class StorageError(WorkbenchError, RuntimeError):
    """The Optuna storage cannot be reached, or holds a study the study file no longer matches."""


class SearchError(WorkbenchError, RuntimeError):
    """Trial after trial of one model fails: something is wrong beyond any one trial."""


class ExportError(WorkbenchError, RuntimeError):
    """The final model cannot be packaged or exported, or its export predicts differently."""
