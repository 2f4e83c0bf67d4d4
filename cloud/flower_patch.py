"""A bound on Flower's wait for the objects of one reply, so that a device killed mid-upload cannot stall the loop."""

from __future__ import annotations

__all__ = ["bound_reply_pulls"]


def bound_reply_pulls(max_time_s: float) -> bool:
    """Bound how long Flower's grid waits for the objects of one reply; return whether the bound is set.

    A SuperNode killed while uploading a reply leaves the reply listed at the SuperLink with objects that never
    arrive; Flower 1.42's ``pull_messages`` then retries them for up to ``PULL_MAX_TIME`` (2 h) and the whole
    aggregation loop stalls. With a bound, the pull gives up after ``max_time_s`` and hands back an error
    reply (``MESSAGE_UNAVAILABLE``) that the loop counts as a lost update, as for a node that left. This sets
    the keyword default of ``flwr.supercore.inflatable.inflatable_utils.pull_objects`` for this process (the
    ServerApp's own); a Flower without that function or keyword leaves its default alone.
    """
    try:
        from flwr.supercore.inflatable import inflatable_utils
    except ImportError:
        return False
    kw = getattr(inflatable_utils.pull_objects, "__kwdefaults__", None)
    if not kw or "max_time" not in kw:
        return False
    kw["max_time"] = float(max_time_s)
    return True
