"""A ClientApp for tests: the real edge ClientApp, except that some partitions send hostile updates.

The first five devices that are not stragglers (cloud/clock.py profiles, so their updates are never too stale
to be looked at) send: a NaN, an Inf, garbage bytes, a wrong shape, a huge norm; the others are honest.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedge.cloud.clock import device_profile
from fedge.common import codec, wire
from fedge.common.config import FedgeConfig, config_from_context
from fedge.edge.client_app import app as edge_app

app = ClientApp()
DENSE = codec.CodecParams(topk_ratio=1.0, bits=32, error_feedback=False)


def _poisoned(delta: dict[str, np.ndarray], value: float) -> bytes:
    payload = codec.encode(delta, DENSE)[0]
    body = bytearray(payload[:-4])
    n = sum(v.size for v in delta.values())
    struct.pack_into("<f", body, len(body) - 4 * n, value)  # first value of the first tensor
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def hostile_payload(kind: int, delta: dict[str, np.ndarray]) -> bytes:
    """The bad payload of partition ``kind`` built from an honest delta."""
    if kind == 0:
        return _poisoned(delta, float("nan"))
    if kind == 1:
        return _poisoned(delta, float("inf"))
    if kind == 2:
        return bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8))
    if kind == 3:
        k = sorted(delta)[0]
        return codec.encode({**delta, k: np.zeros(delta[k].size + 1, np.float32)}, DENSE)[0]
    return codec.encode({k: v * 1e6 for k, v in delta.items()}, DENSE)[0]


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = edge_app(msg, context)  # the real ClientApp, mods included
    pid = int(context.node_config.get("partition-id", 0))
    kind = _hostile_kinds(config_from_context(context.run_config), int(context.node_config["num-partitions"]))
    if pid not in kind:
        return reply
    upd = reply.content[wire.UPDATE]
    delta = codec.decode(upd[wire.DELTA])
    metrics = {k: float(v) for k, v in reply.content[wire.METRICS].items()}
    return Message(wire.update_content(base_version=int(upd[wire.BASE_VERSION]),
                                       payload=hostile_payload(kind[pid], delta), metrics=metrics), reply_to=msg)


def _hostile_kinds(cfg: FedgeConfig, n: int) -> dict[int, int]:
    p = cfg.profiles
    fast = [i for i in range(n) if not device_profile(
        i, n, seed=cfg.seed, straggler_fraction=p.straggler_fraction,
        straggler_slowdown_min=p.straggler_slowdown_min, straggler_slowdown_max=p.straggler_slowdown_max).straggler]
    return {pid: k for k, pid in enumerate(fast[:5])}
