"""Errors the engine raises for problems a user can fix.

Every `NNMError` carries one sentence meant for the user; the CLI prints it and exits non-zero,
the service turns it into a problem+json body. Anything else escaping the engine is a bug.
"""

from __future__ import annotations


class NNMError(Exception):
    """A problem with the user's input or environment, described in one sentence."""

    #: Short machine-readable kind, used by adapters (e.g. as a problem `type` suffix).
    kind = "invalid-input"


class DatasetError(NNMError):
    """The dataset cannot be found, read or decoded, or does not suit the job."""

    kind = "invalid-dataset"


class BadImageError(DatasetError):
    """One image of a dataset cannot be used (corrupt, not an image, too many pixels)."""


class ConfigError(NNMError):
    """A configuration key or value is unknown or invalid."""

    kind = "invalid-config"


class CheckpointError(NNMError):
    """A checkpoint or model file cannot be read or does not fit the model."""

    kind = "invalid-checkpoint"


class Cancelled(Exception):
    """Raised inside a stage when its progress sink asks it to stop."""
