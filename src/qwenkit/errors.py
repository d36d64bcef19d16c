"""Exception hierarchy for errors caused by user input or the environment (not internal bugs)."""
from __future__ import annotations


class QwenkitError(Exception):
    """Base class of every error qwenkit raises on bad input, missing files or resources."""


class ModelNotAvailableError(QwenkitError):
    """A model could not be found locally and could not be fetched."""


class ModelIntegrityError(QwenkitError):
    """A model file exists but is corrupted, truncated or fails its checksum."""


class AdapterError(QwenkitError):
    """A LoRA adapter folder is missing, malformed, or does not fit the model it is applied to."""


class DataError(QwenkitError, ValueError):
    """Training data is malformed, lacks a needed field, or a tokenized shard is corrupt.

    The message names the file (and line / row / document) and what is wrong."""
