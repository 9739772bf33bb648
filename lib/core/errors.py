"""Exceptions a user can act on. Jobs print their message without a traceback."""

from __future__ import annotations


class EmbedfleetError(Exception):
    """Base of errors caused by input or configuration (not by a bug in embedfleet)."""


class ConfigError(EmbedfleetError):
    """The configuration is invalid; the message names the key and the fix."""


class DatasetError(EmbedfleetError):
    """The dataset is missing, empty or has a bad row; the message names file/row/column."""


class ModelError(EmbedfleetError):
    """The model cannot be found or loaded."""


class ShardValidationError(EmbedfleetError):
    """Embedding shards disagree with each other or with their markers."""


class UpstreamIncompleteError(EmbedfleetError):
    """A stage started before the tasks it depends on finished."""


class ConfigMismatchError(EmbedfleetError):
    """A marker was written under a different configuration than the current run's."""


class InvalidMarkerError(EmbedfleetError):
    """A marker exists but is unreadable or its outputs are missing or changed."""


class StorageError(EmbedfleetError):
    """A run dir location cannot be read or written; the message names it and the fix."""


class RunLockedError(EmbedfleetError):
    """Another launcher (or another copy of a task) holds the run dir's lock; the message
    names the holder (host, pid, start) and how to proceed."""
