"""The exceptions edje-search raises on purpose, all rooted at :class:`EdjeError`.

Callers catch ``EdjeError`` for "edje-search refused or could not do it"; the subclasses say
which part was at fault. Each also derives from the builtin a caller would have expected before
the hierarchy existed (ValueError for bad input, RuntimeError for state), so old ``except``
clauses keep working.
"""
from __future__ import annotations


class EdjeError(Exception):
    """Base of every error edje-search raises deliberately."""


class BadQuery(EdjeError, ValueError):
    """A query or search argument that cannot be served (empty, too long, k out of range)."""


class BadInput(EdjeError, ValueError):
    """Arguments or data handed to the library that it cannot use (shapes, dtypes, options)."""


class IndexCorrupt(EdjeError, RuntimeError):
    """The index cannot be used as it is: missing, incomplete, inconsistent or out of reach."""


class StorageUnavailable(IndexCorrupt):
    """The index's storage refused or failed a read (permission, network, time-out): nothing stored
    is known to be damaged, so the remedy is access to the storage, not ``repair``."""


class IndexGone(IndexCorrupt):
    """The index a reader has open was deleted, or replaced by one it cannot switch to."""


class IndexOutdated(IndexCorrupt):
    """The index was written in an older on-disk layout that ``edje-search migrate`` converts."""


class IndexExists(EdjeError, FileExistsError):
    """An index already exists where a new one was to be created."""


class IndexLocked(EdjeError, RuntimeError):
    """Another process holds the index's writer lock."""


class ModelMissing(EdjeError, RuntimeError):
    """A model that was asked for cannot be found or built here."""


class ModelDamaged(EdjeError, RuntimeError):
    """A saved model's weights are missing, truncated or changed, or it computes NaN/inf."""


class ModelMismatch(EdjeError, RuntimeError):
    """The index was built with a different model than the one given."""


class CheckpointError(EdjeError, ValueError):
    """A checkpoint file does not have the layout it claims."""
