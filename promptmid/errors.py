"""Errors raised for bad input or unusable models.

Every error the user can cause is a :class:`PromptMIDError`; the CLI prints its
message on one line of stderr and exits with its ``exit_code``.
"""

from __future__ import annotations


class PromptMIDError(Exception):
    """Base class of user-facing errors."""

    exit_code = 1


class InputError(PromptMIDError):
    """An input image or file is missing, unreadable, empty or unusable."""

    exit_code = 2


class OutputExistsError(PromptMIDError):
    """The output directory exists and ``--overwrite`` was not given."""

    exit_code = 3


class ModelError(PromptMIDError):
    """Model weights are missing, incomplete or do not match their checksum/keys."""

    exit_code = 4


class MatchingError(PromptMIDError):
    """Too few matches or inliers to fit the requested transform."""

    exit_code = 5


class UncertainResultError(PromptMIDError):
    """``--strict``: a transform was found but the QC verdict is ``uncertain``."""

    exit_code = 6
