"""Errors that name what is wrong and how to fix it.

Every error raised on bad user input derives from `Rosa2Error`, so a sweep can catch the family
and record the problem instead of dying with an opaque traceback.
"""


class Rosa2Error(Exception):
    """Base class for every error rosa2_jax raises on bad input or environment."""


class CheckpointNotFoundError(Rosa2Error, FileNotFoundError):
    """A checkpoint folder, file or name does not exist."""


class UnsupportedArchitectureError(Rosa2Error, ValueError):
    """The checkpoint's architecture is not one this decoder implements."""


class CheckpointMismatchError(Rosa2Error, ValueError):
    """A checkpoint is truncated, or its tensors disagree with its config."""


class ChecksumMismatchError(Rosa2Error):
    """A downloaded file's sha256 is not the pinned one."""


class HubUnreachableError(Rosa2Error, ConnectionError):
    """A model hub id was given but the hub cannot be reached."""


class ContextOverflowError(Rosa2Error, ValueError):
    """A prompt plus its generation budget does not fit the model's context window."""
