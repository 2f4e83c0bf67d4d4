"""Stopping child processes: one escalation of signals, shared by the edge agent and the cloud launcher."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable, Sequence

__all__ = ["escalate"]


def escalate(proc: subprocess.Popen, steps: Sequence[tuple[signal.Signals, float]], *,  # type: ignore[type-arg]
             send: Callable[[signal.Signals], None] | None = None,
             on_ignored: Callable[[signal.Signals], None] | None = None) -> bool:
    """Send each signal of ``steps`` in turn, waiting up to its seconds for ``proc`` to exit.

    Parameters
    ----------
    proc : the child process.
    steps : ``(signal, seconds to wait)`` pairs, gentlest first, e.g. SIGTERM then SIGKILL.
    send : how a signal is delivered (default ``proc.send_signal``; e.g. ``os.killpg`` for a process group).
    on_ignored : called with a signal the process outlived.

    Returns
    -------
    bool
        Whether the process is gone (exited, or no longer there to signal).
    """
    deliver = send or proc.send_signal
    for sig, wait_s in steps:
        if proc.poll() is not None:
            return True
        try:
            deliver(sig)
        except ProcessLookupError:
            return True
        try:
            proc.wait(timeout=wait_s)
            return True
        except subprocess.TimeoutExpired:
            if on_ignored is not None:
                on_ignored(sig)
    return proc.poll() is not None
