"""The device's side of secure aggregation (:mod:`fedge.common.secagg`): a TRAIN mod and the QUERY steps.

``secagg_mod`` sits between the DP mod and the compression mod (``ClientApp`` mods, outermost first:
``size_mod, compression_mod, secagg_mod, dp_mod``). On a TRAIN message that carries a group
(``wire.SECAGG``) it takes the float delta (after DP, if any), adds its error-feedback residual, clips it to
the group's L2 bound, quantises the group's shared index set into the ring, masks it and replies with the
masked vector in ``wire.UPDATE[wire.DELTA]`` plus its sealed self-mask shares; the compression mod then has
nothing left to do. Without a group it passes the message on untouched.

:func:`handle_query` answers the three QUERY steps: ``register`` (the node's long-term share-encryption key),
``keys`` (a fresh mask key for one group, its shares sealed to the members) and ``unmask`` (this holder's
shares for the group's sum). Its keys and per-group secrets live in the node's ``Context.state``; a holder
answers one unmasking per group, and never both secrets of one member.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedge.common import secagg as sa
from fedge.common import wire

from .mods import RAW_DELTA

__all__ = ["handle_query", "secagg_mod"]

log = logging.getLogger("fedge.edge")

KEYS_STATE = "secagg-keys"  # Context.state ConfigRecord: c-sk, c-pk, s-seed|<group>, answered|<group>
RESIDUAL_STATE = "secagg-residual"  # error feedback of what the masked uploads left out
MAX_GROUPS_KEPT = 32  # per-group secrets kept (a group is answered within a few versions)


def _keys(ctxt: Context) -> ConfigRecord:
    if KEYS_STATE not in ctxt.state:
        c_sk, c_pk = sa.new_keypair()
        ctxt.state[KEYS_STATE] = ConfigRecord({"c-sk": c_sk, "c-pk": c_pk, "groups": "[]"})
    return ctxt.state.config_records[KEYS_STATE]


def _remember(rec: ConfigRecord, key: str, value: bytes | str, group: str) -> None:
    groups = json.loads(str(rec["groups"]))
    if group not in groups:
        groups.append(group)
    while len(groups) > MAX_GROUPS_KEPT:  # forget the oldest group's secrets
        old = groups.pop(0)
        for k in (f"s-seed|{old}", f"answered|{old}"):
            if k in rec:
                del rec[k]
    rec["groups"] = json.dumps(groups)
    rec[key] = value


def spec_from_record(rec: ConfigRecord) -> sa.GroupSpec:
    """The group a TRAIN (or unmask QUERY) message names."""
    try:
        return sa.GroupSpec(group_id=str(rec[wire.SA_GROUP]), c_pks=tuple(rec[wire.SA_C_PKS]),  # type: ignore[arg-type]
                            s_pks=tuple(rec[wire.SA_S_PKS]), t=int(rec[wire.SA_T]),  # type: ignore[arg-type]
                            n=int(rec[wire.SA_N]), k=int(rec[wire.SA_K]),  # type: ignore[arg-type]
                            clip=float(rec[wire.SA_CLIP]),  # type: ignore[arg-type]
                            levels=int(rec.get(wire.SA_LEVELS, 1)),  # type: ignore[arg-type]
                            norm_cap=float(rec.get(wire.SA_NORM_CAP, 0.0)))  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as e:
        raise sa.SecAggError(f"secure aggregation record lacks or garbles {e}") from None


def secagg_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Mask the TRAIN reply's float delta for the message's group (pass-through without one)."""
    reply = call_next(msg, ctxt)
    if wire.SECAGG not in msg.content or reply.has_error() or RAW_DELTA not in reply.content:
        return reply
    rec = msg.content.config_records[wire.SECAGG]
    spec = spec_from_record(rec)
    index = int(rec[wire.SA_INDEX])  # type: ignore[arg-type]
    keys = _keys(ctxt)
    s_key = f"s-seed|{spec.group_id}"
    if s_key not in keys:
        raise sa.SecAggError(f"no mask key for group {spec.group_id} (the key round did not reach this node)")
    delta = wire.record_to_adapters(reply.content.array_records[RAW_DELTA])
    flat, layout = sa.flatten(delta)
    if RESIDUAL_STATE in ctxt.state:
        res = wire.record_to_adapters(ctxt.state.array_records[RESIDUAL_STATE]).get("flat")
        if res is not None and res.shape == flat.shape:
            flat = flat + res
    norm = float(np.linalg.norm(flat.astype(np.float64)))
    clipped = flat * np.float32(min(1.0, spec.clip / norm)) if norm > 0 else flat
    upload, sent = sa.member_mask(clipped, spec, index, bytes(keys["c-sk"]),  # type: ignore[arg-type]
                                  bytes(keys[s_key]), np.random.default_rng(), norm=norm)  # type: ignore[arg-type]
    ctxt.state[RESIDUAL_STATE] = ArrayRecord({"flat": Array(np.ascontiguousarray(clipped - sent, np.float32))})
    del reply.content[RAW_DELTA]
    reply.content.config_records[wire.UPDATE][wire.DELTA] = upload.payload
    reply.content[wire.SECAGG] = ConfigRecord({wire.SA_GROUP: spec.group_id, wire.SA_INDEX: index,
                                               wire.SA_SEALED: list(upload.sealed_b),
                                               wire.SA_COMMIT: upload.commit_b})
    metrics = reply.content.metric_records[wire.METRICS]
    metrics[wire.RAW_BYTES] = float(4 * flat.size)
    log.debug("secure update for group %s (member %d of %d, layout of %d tensors)", spec.group_id, index,
              spec.size, len(layout))
    return reply


def handle_query(msg: Message, ctxt: Context) -> Message:
    """Answer a secure-aggregation QUERY (register, keys, unmask); an error reply says why it refused."""
    rec = msg.content.config_records[wire.SECAGG]
    op = str(rec.get(wire.SA_OP, ""))
    keys = _keys(ctxt)
    out: dict[str, Any]
    if op == wire.OP_REGISTER:
        out = {wire.SA_C_PK: bytes(keys["c-pk"])}  # type: ignore[arg-type]
    elif op == wire.OP_KEYS:
        group, index = str(rec[wire.SA_GROUP]), int(rec[wire.SA_INDEX])  # type: ignore[arg-type]
        c_pks = list(rec[wire.SA_C_PKS])  # type: ignore[arg-type]
        if c_pks[index] != keys["c-pk"]:
            raise sa.SecAggError(f"the roster of group {group} lists another key at this node's index {index}")
        s_seed, ans = sa.member_keys(group, index, bytes(keys["c-sk"]), c_pks, int(rec[wire.SA_T]))  # type: ignore[arg-type]
        _remember(keys, f"s-seed|{group}", s_seed, group)
        out = {wire.SA_S_PK: ans.s_pk, wire.SA_SEALED: list(ans.sealed_s), wire.SA_COMMIT: ans.commit_s}
    elif op == wire.OP_UNMASK:
        spec = spec_from_record(rec)
        index = int(rec[wire.SA_INDEX])  # type: ignore[arg-type]
        senders = [int(i) for i in rec[wire.SA_SENDERS]]  # type: ignore[union-attr]
        dropped = [int(j) for j in rec[wire.SA_DROPPED]]  # type: ignore[union-attr]
        asked = json.dumps([sorted(senders), sorted(dropped)])
        done = keys.get(f"answered|{spec.group_id}")
        if done is not None and done != asked:  # a second, different question would unmask a difference
            raise sa.SecAggError(f"group {spec.group_id} was unmasked already for other senders")
        b_sh, s_sh = sa.member_reveal(spec, index, bytes(keys["c-sk"]),  # type: ignore[arg-type]
                                      dict(zip(senders, rec[wire.SA_SEALED_B])),  # type: ignore[arg-type]
                                      dict(zip(dropped, rec[wire.SA_SEALED_S])),  # type: ignore[arg-type]
                                      senders, dropped)
        _remember(keys, f"answered|{spec.group_id}", asked, spec.group_id)
        out = {wire.SA_B_SHARES: [b_sh[i].to_bytes(sa.SHARE_LEN, "big") for i in senders],
               wire.SA_S_SHARES: [s_sh[j].to_bytes(sa.SHARE_LEN, "big") for j in dropped]}
    else:
        raise sa.SecAggError(f"unknown secure aggregation step {op!r}")
    return Message(RecordDict({wire.SECAGG: ConfigRecord(out)}), reply_to=msg)
