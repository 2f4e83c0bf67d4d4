"""The error every config section raises and the two checks it validates with: both name the dotted key."""

from __future__ import annotations

__all__ = ["ConfigError", "check", "fail"]


class ConfigError(ValueError):
    """A configuration key is unknown or its value is invalid; the message names the dotted key."""


def fail(key: str, msg: str) -> None:
    """Raise :class:`ConfigError` for ``key``."""
    raise ConfigError(f"config key '{key}': {msg}")


def check(cond: bool, key: str, msg: str) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``cond`` holds."""
    if not cond:
        fail(key, msg)
