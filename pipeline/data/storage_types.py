"""The types every storage backend shares: :class:`StorageError` and :class:`ObjectInfo`.

A module of its own so that imports flow one way: :mod:`pipeline.data.storage` (the backends and the
URL-dispatching API) and :mod:`pipeline.data.s3` (boto3) both import it, and :mod:`pipeline.data.s3` never
imports :mod:`pipeline.data.storage`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import PipelineError


class StorageError(PipelineError):
    """A storage operation failed; the message names the URL or path and what to check.

    Messages never carry credentials or raw request headers, so they are safe to log.
    """


@dataclass(frozen=True)
class ObjectInfo:
    """What a stat/HEAD returns for one file or object."""

    size: int
    """Size in bytes."""
    metadata: dict[str, str] = field(default_factory=dict)
    """User metadata (S3 lower-cases the keys); always empty for local files."""
