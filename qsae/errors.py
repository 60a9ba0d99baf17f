"""Exception types with messages that name the problem, so users see what to fix."""

from __future__ import annotations


class QsaeError(Exception):
    """Base class for every error qsae raises on purpose.

    ``transient`` says whether trying again may help (an unreachable store may come back; a
    malformed dataset will not): orchestration retries only transient ones.
    """

    transient = False


class SAEFormatError(QsaeError):
    """An SAE file or folder is missing keys, has wrong shapes or non-finite weights."""


class UntrustedPickleError(SAEFormatError):
    """A .pt file needs more than tensors and plain containers to load; it is refused."""


class SAENotCachedError(QsaeError):
    """A Hugging Face repo id was given but is not in the local cache (we never download)."""


class ModelNotFoundError(QsaeError):
    """A model name is neither a local folder, a cached repo id, nor an installed embedded model."""


class SAEModelMismatchError(QsaeError):
    """The SAE's d_model does not equal the model's hidden size."""


class LayerError(QsaeError, ValueError):
    """A requested layer does not exist in the model, the lake or the store (or none was chosen)."""


class SchemaError(QsaeError):
    """A store does not follow the lake schema (missing variable, wrong dims or dtype)."""


class NewerSchemaError(SchemaError):
    """A store was written by a newer schema version than this qsae understands."""


class LineageError(QsaeError):
    """A lake's lineage does not match what an analysis was given (e.g. its codes come from
    another SAE than the one named, so feature indices would silently mean other features)."""


class UsageError(QsaeError):
    """A command that cannot run as given (e.g. a capture with no --store: it would write into the demo's lake)."""


class ConfigMismatchError(QsaeError):
    """An existing store was created with a different config than the one asked for."""


class RegionError(QsaeError):
    """A write region does not align with the store's shard grid (would lose data)."""


class StoreUnreachableError(QsaeError):
    """A store URL cannot be reached or opened."""

    transient = True


class DatasetError(QsaeError):
    """A dataset is empty, unreadable or has malformed rows."""


class LakeDamagedError(QsaeError):
    """Objects that done questions need are missing, empty or do not decode: zarr would read
    fill values there and the analyses would silently compute other numbers."""


class ConcurrentCreationError(QsaeError):
    """Another capture is creating the same store right now (or did seconds ago): this one
    stops without touching it. Trying again later finds the store made, or re-creates it if
    that creation died."""

    transient = True


class IncompleteStoreError(SchemaError):
    """A store whose creation never finished (its identity marked as being created)."""


class StoreFullError(QsaeError):
    """The disk (or quota) under a store is full: the region being written is not marked done."""


class ModelFileError(QsaeError):
    """A model's files are there but cannot be read (truncated, damaged)."""


class NothingCapturedError(QsaeError):
    """An analysis was asked of a lake with no captured (done) question: nothing to compute."""


class ResultError(QsaeError):
    """A result group a reader needs is missing, damaged or stale (computed from another state of the lake)."""


class ResultMissingError(ResultError):
    """The store holds no such result group (whatever its consolidated metadata lists)."""


class ResultDamagedError(ResultError):
    """A chunk of a result group is missing, empty or does not decode."""


class StaleResultError(ResultError):
    """A result group was computed from another state of the lake (fewer questions done, another lake)."""
