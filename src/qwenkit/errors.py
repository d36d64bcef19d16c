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


class ImageInputError(QwenkitError, ValueError):
    """An image input cannot be used: unreachable, too large, truncated, not an image, or refused.

    The message says which limit or check failed; ``param`` names the request field it came
    from when known (``messages[0].content[1].image_url.url``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
