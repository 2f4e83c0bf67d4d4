"""The server's side of secure aggregation: groups of devices whose buffer the server can unmask only as a sum.

A secure run dispatches work in groups (:mod:`fedge.common.secagg`): the loop picks ``K`` idle nodes, this module
asks them for their long-term share keys once (``register``) and for a fresh mask key per group (``keys``,
its shares sealed to the members), and gives each member's TRAIN message the group's record. Replies come
back whenever they arrive (members train on whatever version was current when the group was dispatched); a
member that times out, leaves or is refused is resolved as dropped. Once every member is resolved, the holders
still online answer one ``unmask`` QUERY each and :meth:`SecureGroups.finish` returns the group's sum.

What the server can still check per update is counted with :class:`fedge.cloud.validation.Reason`: the masked
payload's format and length (``secagg_invalid``), its base version, its staleness. A group left with fewer
than two senders is never unmasked (``secagg_alone``); a group whose shares are inconsistent, miss a
commitment or whose sum is out of range is discarded (``secagg_discarded``, one count per sender).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedge.common import secagg as sa
from fedge.common import wire

from .validation import RawUpdate, Reason

__all__ = ["NORM_CAP_FACTOR", "Group", "SecureGroups", "Send", "group_mean"]

NORM_CAP_FACTOR = 4.0  # a group asks for norms up to this times its clip
EMA_NEW = 0.3  # weight of the newest group in the running send rate and clip

log = logging.getLogger("fedge.server")

Send = Callable[[list[Message]], list[Message]]  # grid.send_and_receive with the loop's timeout


@dataclass
class Group:
    """One group: its roster, keys, and what its members sent so far."""

    spec: sa.GroupSpec
    nodes: list[int]  # member index -> node id
    sealed_s: list[tuple[bytes, ...]]  # dealer -> its key shares, holder-aligned
    commits_s: list[bytes]
    pending: set[int] = field(default_factory=set)  # member indices not yet resolved
    uploads: dict[int, sa.MaskedUpdate] = field(default_factory=dict)
    base_versions: dict[int, int] = field(default_factory=dict)
    upload_bytes: int = 0

    @property
    def gid(self) -> str:
        return self.spec.group_id

    @property
    def complete(self) -> bool:
        return not self.pending


def _query(node: int, rec: dict[str, Any]) -> Message:
    return Message(RecordDict({wire.SECAGG: ConfigRecord(rec)}), dst_node_id=int(node),
                   message_type=MessageType.QUERY)


def _answers(replies: Sequence[Message]) -> dict[int, ConfigRecord]:
    out = {}
    for r in replies:
        if r.has_error():
            log.warning("node %d refused a secure aggregation step: %s", r.metadata.src_node_id,
                        str(r.error.reason)[:300])
        elif wire.SECAGG in r.content:
            out[int(r.metadata.src_node_id)] = r.content.config_records[wire.SECAGG]
    return out


class SecureGroups:
    """Groups in flight, the nodes' registered share keys, and which dispatch belongs to which member.

    ``n``: coordinates of an update; ``k``: coordinates a group keeps (its shared random index set);
    ``clip``: the devices' L2 bound; ``threshold``: Shamir threshold as a fraction of the group;
    ``levels``: quantisation levels per side of a sent coordinate; ``adapt_clip``: groups also send their
    members' norms (masked, :data:`fedge.common.secagg.NORM_SLOTS`) and ``clip`` follows the mean norm the
    unmasked groups report (an exponential average; ``clip`` is then only where it starts).
    """

    def __init__(self, *, n: int, k: int, clip: float, threshold: float, levels: int = 1,
                 adapt_clip: bool = False) -> None:
        self.n, self.k, self.clip, self.threshold, self.levels = n, k, clip, threshold, levels
        self.adapt_clip = adapt_clip
        self.send_rate = 1.0  # running share of a group's members that send (devices drop out, time out)
        self.c_pks: dict[int, bytes] = {}
        self.groups: dict[str, Group] = {}
        self.by_dispatch: dict[int, tuple[str, int]] = {}  # dispatch index -> (group id, member index)

    # ------------------------------------------------------------------ forming a group
    def group_size(self, buffer_size: int) -> int:
        """Members to dispatch so that about ``buffer_size`` of them send: ``buffer_size / send_rate`` (a group
        is one buffer; plain FedBuff fills its buffer with accepted updates, a secure group cannot take
        late-comers once masked), at most as many as keep the ring of a group of ``buffer_size`` (a wider
        ring and more sealed shares would cost every member bytes)."""
        want = math.ceil(buffer_size / max(self.send_rate, 0.5) - 1e-9)
        bits = sa.Quantizer(clip=1.0, k=1, group=buffer_size, levels=self.levels).bits
        most = max(buffer_size, sa.Quantizer.largest_group(bits, self.levels))
        return max(sa.MIN_GROUP, min(want, most))

    def resolved(self, g: Group) -> None:
        """A group has all its members resolved: fold its share of senders into :attr:`send_rate`."""
        self.send_rate = _ema(self.send_rate, len(g.uploads) / max(g.spec.size, 1))

    def register(self, nodes: Sequence[int], send: Send) -> None:
        """Learn the long-term share keys of nodes not yet known (one QUERY each)."""
        new = [n for n in nodes if n not in self.c_pks]
        if not new:
            return
        for node, rec in _answers(send([_query(n, {wire.SA_OP: wire.OP_REGISTER}) for n in new])).items():
            pk = rec.get(wire.SA_C_PK)
            if isinstance(pk, bytes) and len(pk) == 32:
                self.c_pks[node] = pk

    def open(self, nodes: Sequence[int], send: Send) -> Group | None:
        """Run the key round with ``nodes``; ``None`` when fewer than two of them take part.

        A member missing from the key round changes the roster its peers sealed shares for, so the round is
        run again with those that answered (at most twice).
        """
        self.register(nodes, send)
        members = [n for n in nodes if n in self.c_pks]
        for _ in range(2):
            if len(members) < sa.MIN_GROUP:
                return None
            gid = secrets.token_hex(8)
            c_pks = [self.c_pks[n] for n in members]
            t = sa.threshold(len(members), self.threshold)
            msgs = [_query(n, {wire.SA_OP: wire.OP_KEYS, wire.SA_GROUP: gid, wire.SA_INDEX: i,
                               wire.SA_C_PKS: c_pks, wire.SA_T: t}) for i, n in enumerate(members)]
            got = _answers(send(msgs))
            ok = [n for n in members if _keys_ok(got.get(n), len(members))]
            if len(ok) == len(members):
                recs = [got[n] for n in members]
                spec = sa.GroupSpec(group_id=gid, c_pks=tuple(c_pks),
                                    s_pks=tuple(bytes(r[wire.SA_S_PK]) for r in recs),  # type: ignore[arg-type]
                                    t=t, n=self.n, k=self.k, clip=self.clip, levels=self.levels,
                                    norm_cap=NORM_CAP_FACTOR * self.clip if self.adapt_clip else 0.0)
                g = Group(spec=spec, nodes=list(members),
                          sealed_s=[tuple(r[wire.SA_SEALED]) for r in recs],  # type: ignore[arg-type]
                          commits_s=[bytes(r[wire.SA_COMMIT]) for r in recs])  # type: ignore[arg-type]
                # what each member uploaded in the key round counts towards the group's bytes
                g.upload_bytes = sum(32 + 32 + sum(len(x) for x in r[wire.SA_SEALED]) for r in recs)  # type: ignore[union-attr, misc, arg-type]
                self.groups[gid] = g
                return g
            members = ok
        return None

    def train_record(self, g: Group, index: int) -> ConfigRecord:
        """The SECAGG record of member ``index``'s TRAIN message."""
        s = g.spec
        return ConfigRecord({wire.SA_GROUP: s.group_id, wire.SA_INDEX: index, wire.SA_C_PKS: list(s.c_pks),
                             wire.SA_S_PKS: list(s.s_pks), wire.SA_T: s.t, wire.SA_N: s.n, wire.SA_K: s.k,
                             wire.SA_CLIP: s.clip, wire.SA_LEVELS: s.levels, wire.SA_NORM_CAP: s.norm_cap})

    def bind(self, g: Group, index: int, dispatch_index: int) -> None:
        g.pending.add(index)
        self.by_dispatch[dispatch_index] = (g.gid, index)

    # ------------------------------------------------------------------ replies
    def arrived(self, dispatch_index: int, raw: RawUpdate, content: Any, *, dispatched_version: int,
                current_version: int, max_staleness: int) -> tuple[Group | None, Reason | None, str]:
        """A member's reply: keep its masked update or say why not (the member is then resolved as dropped)."""
        g, index = self._resolve(dispatch_index)
        if g is None:
            return None, Reason.SECAGG_INVALID, "no secure group for this dispatch"
        try:
            rec = content[wire.SECAGG]
            sealed = tuple(bytes(x) for x in rec[wire.SA_SEALED])
            commit = bytes(rec[wire.SA_COMMIT])
            if str(rec[wire.SA_GROUP]) != g.gid or int(rec[wire.SA_INDEX]) != index:
                raise sa.SecAggError("reply names another group or member")
            if len(sealed) != g.spec.size or any(len(x) != sa.SEALED_LEN for x in sealed) or len(commit) != 32:
                raise sa.SecAggError(f"{len(sealed)} sealed shares for a group of {g.spec.size}")
            sa.decode_masked(raw.payload, g.spec.values, g.spec.quantizer.bits)
        except (KeyError, TypeError, ValueError) as e:
            return g, Reason.SECAGG_INVALID, str(e)[:200]
        if raw.base_version != dispatched_version:
            return g, Reason.VERSION_MISMATCH, f"claims base {raw.base_version}, was sent {dispatched_version}"
        if current_version - raw.base_version > max_staleness:
            return g, Reason.STALE, f"staleness {current_version - raw.base_version} > {max_staleness}"
        g.uploads[index] = sa.MaskedUpdate(raw.payload, sealed, commit)
        g.base_versions[index] = raw.base_version
        g.upload_bytes += len(raw.payload) + sum(len(x) for x in sealed)
        return g, None, ""

    def lost(self, dispatch_index: int) -> Group | None:
        """A member that will not send (timeout, left, refused before the state): resolved as dropped."""
        return self._resolve(dispatch_index)[0]

    def _resolve(self, dispatch_index: int) -> tuple[Group | None, int]:
        gid, index = self.by_dispatch.pop(dispatch_index, ("", -1))
        g = self.groups.get(gid)
        if g is not None:
            g.pending.discard(index)
        return g, index

    # ------------------------------------------------------------------ unmasking
    def unmask_messages(self, g: Group, holders: Sequence[int]) -> list[Message]:
        """One ``unmask`` QUERY per holder (member indices) with the shares sealed for it."""
        senders = sorted(g.uploads)
        dropped = [j for j in range(g.spec.size) if j not in g.uploads]
        base = dict(self.train_record(g, 0))
        out = []
        for h in holders:
            rec = {**base, wire.SA_OP: wire.OP_UNMASK, wire.SA_INDEX: h, wire.SA_SENDERS: senders,
                   wire.SA_DROPPED: dropped, wire.SA_SEALED_B: [g.uploads[i].sealed_b[h] for i in senders],
                   wire.SA_SEALED_S: [g.sealed_s[j][h] for j in dropped]}
            out.append(_query(g.nodes[h], rec))
        return out

    def finish(self, g: Group, replies: Sequence[Message]) -> np.ndarray:
        """The group's float sum (length ``n``) from the holders' replies; the group is then forgotten.

        Raises :class:`fedge.common.secagg.SecAggError` when it cannot be unmasked (too few holders, an
        inconsistent share, a missed commitment, a sum out of range).
        """
        self.groups.pop(g.gid, None)
        senders = sorted(g.uploads)
        dropped = [j for j in range(g.spec.size) if j not in g.uploads]
        index_of = {n: i for i, n in enumerate(g.nodes)}
        answers: dict[int, tuple[dict[int, int], dict[int, int]]] = {}
        for node, rec in _answers(replies).items():
            try:
                b = [int.from_bytes(bytes(x), "big") for x in rec[wire.SA_B_SHARES]]  # type: ignore[union-attr, arg-type]
                s = [int.from_bytes(bytes(x), "big") for x in rec[wire.SA_S_SHARES]]  # type: ignore[union-attr, arg-type]
            except (KeyError, TypeError) as e:
                log.warning("group %s: holder %d's answer unreadable (%s)", g.gid, node, e)
                continue
            if node in index_of and len(b) == len(senders) and len(s) == len(dropped):
                answers[index_of[node]] = (dict(zip(senders, b)), dict(zip(dropped, s)))
        total, mean_norm = sa.server_unmask_norm(g.spec, g.commits_s, g.uploads, answers)
        if self.adapt_clip and np.isfinite(mean_norm) and mean_norm > 0:
            self.clip = _ema(self.clip, mean_norm)  # the cap (4x the clip) lets it grow 1.9x a group
        return total


def _ema(old: float, new: float) -> float:
    """The running estimates of a run (send rate, clip) follow each resolved group with weight :data:`EMA_NEW`."""
    return (1.0 - EMA_NEW) * old + EMA_NEW * new


def _keys_ok(rec: ConfigRecord | None, size: int) -> bool:
    if rec is None:
        return False
    try:
        return (len(bytes(rec[wire.SA_S_PK])) == 32 and len(rec[wire.SA_SEALED]) == size  # type: ignore[arg-type]
                and len(bytes(rec[wire.SA_COMMIT])) == 32)  # type: ignore[arg-type]
    except (KeyError, TypeError):
        return False


def group_mean(total: np.ndarray, senders: int, *, dp_noise: float = 0.0, clip: float = 1.0,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """The group's mean update; with ``dp_noise`` > 0 Gaussian noise of std ``dp_noise * clip`` is added to
    the sum once (central DP: each device's clipped contribution is hidden in it) before dividing."""
    if dp_noise > 0:
        total = total + (rng or np.random.default_rng()).normal(0.0, dp_noise * clip, total.shape)
    return (np.asarray(total, np.float64) / max(senders, 1)).astype(np.float32)
