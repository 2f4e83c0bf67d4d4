"""The errors of shard delivery to a device (:mod:`fedge.edge.shards`): one class per way it can fail."""

from __future__ import annotations

__all__ = [
    "CacheBudgetError",
    "ShardAuthError",
    "ShardDownloadError",
    "ShardError",
    "ShardInsecureError",
    "ShardIntegrityError",
    "ShardTLSError",
    "ShardUnavailableError",
    "ShardVersionError",
]


class ShardError(RuntimeError):
    """Base class of shard delivery errors."""


class ShardIntegrityError(ShardError):
    """A downloaded shard's sha256 differs from the signed manifest; the bytes were deleted."""


class ShardAuthError(ShardError):
    """The server refused the device's token (HTTP 401/403)."""


class ShardTLSError(ShardError):
    """The server's TLS certificate does not verify against the pinned CA."""


class ShardUnavailableError(ShardError):
    """A shard or manifest is neither reachable nor in the cache."""


class ShardDownloadError(ShardError):
    """A download was interrupted; the partial file is kept and the next attempt resumes it."""


class CacheBudgetError(ShardError):
    """The shards needed right now do not fit in the cache's byte budget."""


class ShardVersionError(ShardError):
    """A manifest is not the version asked for, or is older than the newest this device has accepted."""


class ShardInsecureError(ShardError):
    """The device token would travel in clear text (plain ``http://``) and that was not allowed."""
