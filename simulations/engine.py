"""Flower's simulation engine at 10,000 nodes: one scan of the stored messages per delivery pass.

Flower 1.42's engine hands messages to its workers from a thread (``vce_api.add_messages_to_queue``) that asks
the link state, node by node, for that node's next message; each ask scans every stored message and re-checks
its expiry. A pass thus costs O(nodes x stored messages): 10,000 nodes with a few hundred messages in flight
take seconds per 0.1 s pass (the GIL it holds slows the ServerApp in the same process), and asking 10,000 nodes
which device they are (one QUERY each) takes minutes. :func:`install` replaces that pump with one that
scans the stored messages once per pass and keeps its contract: at most one undelivered message per node per
pass, marked delivered, in the order the link state holds them. The apps and everything else stay Flower's.
"""

from __future__ import annotations

import logging
import threading
from queue import Queue
from typing import Any

__all__ = ["add_messages_to_queue", "install", "next_messages"]

log = logging.getLogger("fedge.simulations")
_flower_pump: Any = None  # Flower's own add_messages_to_queue, kept by install()


def next_messages(state: Any, nodes: Any) -> list[Any]:
    """The next undelivered message of every node in ``nodes`` (one scan), marked delivered.

    ``state`` is Flower's ``InMemoryLinkState``; expired messages are dropped first, as Flower's own scan does.
    """
    from flwr.supercore.date import now

    with state.lock:
        ids = list(state.message_ins_store)
        state._check_stored_messages(set(ids))  # expiry and federation checks, once per pass
        out, seen = [], set()
        for mid in ids:
            msg = state.message_ins_store.get(mid)
            if msg is None or msg.metadata.delivered_at != "":
                continue
            dst = msg.metadata.dst_node_id
            if dst in nodes and dst not in seen:
                seen.add(dst)
                out.append(msg)
        stamp = now().isoformat()
        for msg in out:
            msg.metadata.delivered_at = stamp
    return out


def add_messages_to_queue(state: Any, queue: Queue, nodes_mapping: dict[int, int],
                          f_stop: threading.Event) -> None:
    """Drop-in for ``vce_api.add_messages_to_queue``: every 0.1 s, queue each node's next message."""
    if not hasattr(state, "message_ins_store") and _flower_pump is not None:  # another link state
        return _flower_pump(state, queue, nodes_mapping, f_stop)
    nodes = set(nodes_mapping)
    while not f_stop.is_set():
        for msg in next_messages(state, nodes):
            queue.put(msg)
        f_stop.wait(0.1)


def install() -> bool:
    """Use :func:`add_messages_to_queue` in Flower's simulation engine; False (Flower's own kept) when this
    Flower's engine or link state is not the one it was written against."""
    try:
        from flwr.server.superlink.fleet.vce import vce_api
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
        from flwr.supercore.date import now  # noqa: F401
    except ImportError:
        return False
    needed = ("_check_stored_messages", "get_message_ins")
    if not hasattr(vce_api, "add_messages_to_queue") or not all(hasattr(InMemoryLinkState, n) for n in needed):
        log.warning("Flower's simulation engine differs from 1.42's: its own message pump is kept")
        return False
    global _flower_pump
    if vce_api.add_messages_to_queue is not add_messages_to_queue:
        _flower_pump = vce_api.add_messages_to_queue
        vce_api.add_messages_to_queue = add_messages_to_queue  # type: ignore[assignment]
    return True
