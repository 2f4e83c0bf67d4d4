"""Secure aggregation math for one group of devices (SecAgg, Bonawitz et al., CCS 2017): pure functions.

A group of ``K`` devices is one aggregation buffer. Each member ``i`` holds two fresh X25519 key pairs for the
group (``c``: encrypts shares to the other members; ``s``: pairwise mask agreement) and sends

    y_i = q(x_i) + PRG(b_i) + sum_{j != i} sign(i, j) PRG(s_ij)   (mod 2^bits)

where ``q`` is the stochastic quantisation of its clipped update on the group's shared random index set,
``b_i`` a fresh self-mask seed and ``s_ij`` the X25519 agreement of ``i``'s and ``j``'s ``s`` keys (``+`` when
``i < j``). Pairwise masks cancel in the group's sum. ``b_i`` and the seed of the ``s`` key are Shamir-shared
(threshold ``t``) to the members, encrypted with AES-GCM under the ``c`` agreement. For the unmasking the
server asks the members that are still online, for each sender, a share of ``b_i``, and for each member that
sent nothing, a share of its ``s`` key; ``t`` answers rebuild them, so up to ``K - t`` members may be gone
(whether they dropped before or after sending). A member never reveals both secrets of one member.

Ring arithmetic is mod ``2^bits`` in ``uint32``, the smallest ring in which a group's honest sum never wraps
with one value to spare, so a garbage mask is caught by a range check on the unmasked sum. Shamir shares
live in GF(2^130 - 5) (Python integers; a secret is 16 bytes). No Flower, no I/O.

The pieces sit by concept: :mod:`~fedge.common.secagg_ring` (quantiser, ring arithmetic, masks, wire form),
:mod:`~fedge.common.secagg_keys` (key agreement, signatures, commitments, Shamir, sealed shares) and
:mod:`~fedge.common.secagg_vector` (flattening, index set); this module is the protocol that
composes them, and re-exports every name of the three, so ``fedge.common.secagg`` is the one import needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedge.common.secagg_keys import (
    MIN_GROUP,
    PRIME,
    SEALED_LEN,
    SEED_BYTES,
    SHARE_LEN,
    agree,
    commitment,
    key_message,
    keypair_from_seed,
    new_keypair,
    open_share,
    pairwise_seed,
    seal_share,
    shamir_combine,
    shamir_split,
    share_key,
    sign,
    threshold,
    verify,
)
from fedge.common.secagg_ring import (
    MAGIC,
    MAX_RING_BITS,
    Quantizer,
    SecAggError,
    decode_masked,
    encode_masked,
    from_ring,
    in_range,
    mask,
    pack,
    pair_sign,
    prg,
    ring_add,
    to_ring,
    unmask_sum,
    unpack,
)
from fedge.common.secagg_vector import flatten, index_set, scatter, unflatten

__all__ = [
    "MAGIC",
    "MAX_RING_BITS",
    "MIN_GROUP",
    "NORM_SLOTS",
    "PRIME",
    "SEALED_LEN",
    "SEED_BYTES",
    "SHARE_LEN",
    "GroupSpec",
    "KeyShares",
    "MaskedUpdate",
    "Quantizer",
    "SecAggError",
    "agree",
    "commitment",
    "decode_masked",
    "encode_masked",
    "expand",
    "flatten",
    "from_ring",
    "in_range",
    "index_set",
    "key_message",
    "keypair_from_seed",
    "mask",
    "member_keys",
    "member_mask",
    "member_reveal",
    "new_keypair",
    "open_share",
    "pack",
    "pair_sign",
    "pairwise_seed",
    "prg",
    "ring_add",
    "scatter",
    "seal_share",
    "server_unmask",
    "server_unmask_norm",
    "shamir_combine",
    "shamir_split",
    "share_key",
    "sign",
    "threshold",
    "to_ring",
    "unflatten",
    "unmask_sum",
    "unpack",
    "verify",
]


# ---------------------------------------------------------------------------------------------- protocol
# Per group, over three messages to each member and one answer from each holder:
#   keys   (server -> member: roster's long-term c keys)  -> s_pk, sealed shares of s's seed, its commitment
#   train  (server -> member: GroupSpec)                  -> masked update, sealed shares of b, commitment of b
#   unmask (server -> holder: senders, dropped, sealed)   -> b shares of senders, s shares of dropped members
@dataclass(frozen=True)
class KeyShares:
    """A member's answer to the key round: its mask-agreement public key and its key's sealed shares."""

    s_pk: bytes
    sealed_s: tuple[bytes, ...]  # holder index -> sealed share of the s key's seed
    commit_s: bytes


@dataclass(frozen=True)
class GroupSpec:
    """What every member of a group is told before it masks: the roster's keys, threshold and quantiser."""

    group_id: str
    c_pks: tuple[bytes, ...]  # member index -> long-term share-encryption public key
    s_pks: tuple[bytes, ...]  # member index -> this group's mask-agreement public key
    t: int
    n: int  # coordinates of the whole update
    k: int  # coordinates kept (the group's shared random index set)
    clip: float
    levels: int = 1  # quantisation levels per side (1: ternary)
    norm_cap: float = 0.0  # > 0: each member also sends its update's norm (over NORM_SLOTS values, in [0, cap])

    @property
    def values(self) -> int:
        """Ring values a member sends: the ``k`` kept coordinates, then the norm's slots if any."""
        return self.k + (NORM_SLOTS if self.norm_cap > 0 else 0)

    @property
    def size(self) -> int:
        return len(self.s_pks)

    @property
    def quantizer(self) -> Quantizer:
        return Quantizer(clip=self.clip, k=self.k, group=self.size, levels=self.levels)

    def indices(self) -> np.ndarray:
        """The ``k`` coordinates every member sends: random from the group id (public), fresh per group."""
        return index_set(b"fedge-secagg-index|" + self.group_id.encode(), self.n, self.k)


NORM_SLOTS = 64  # a member's norm travels masked as this many 0/1 values, each 1 with probability norm / cap:
# the server learns only the group's mean norm (to within about cap / sqrt(64 senders)), never one member's


@dataclass(frozen=True)
class MaskedUpdate:
    """A member's upload: the masked vector, one sealed self-mask share per member, and the commitment."""

    payload: bytes
    sealed_b: tuple[bytes, ...]  # holder index -> sealed share of b
    commit_b: bytes


def _seal_all(secret: bytes, c_sk: bytes, c_pks: Sequence[bytes], group_id: str, purpose: bytes, dealer: int,
              t: int) -> tuple[bytes, ...]:
    shares = shamir_split(secret, len(c_pks), t)
    return tuple(seal_share(share_key(c_sk, pk, group_id), group_id, purpose, dealer, h, shares[h])
                 for h, pk in enumerate(c_pks))


def member_keys(group_id: str, index: int, c_sk: bytes, c_pks: Sequence[bytes], t: int
                ) -> tuple[bytes, KeyShares]:
    """Key round: a fresh mask key for the group (from a 128-bit seed), the seed's shares sealed to every
    member; returns ``(seed, answer)``."""
    if not 0 <= index < len(c_pks):
        raise SecAggError(f"member index {index} outside a roster of {len(c_pks)}")
    s_seed = os.urandom(SEED_BYTES)
    _, s_pk = keypair_from_seed(s_seed)
    return s_seed, KeyShares(s_pk, _seal_all(s_seed, c_sk, c_pks, group_id, b"s", index, t), commitment(s_seed))


def member_mask(flat: np.ndarray, spec: GroupSpec, index: int, c_sk: bytes, s_seed: bytes,
                rng: np.random.Generator, *, norm: float = 0.0) -> tuple[MaskedUpdate, np.ndarray]:
    """Mask a member's clipped flat update; return the upload and what it sent in float (error feedback).

    ``flat`` is the whole update (``n`` float values, already clipped to ``spec.clip``): only the group's
    index set is kept, quantised stochastically. ``s_seed``: this member's mask-key seed from the key round.
    ``norm``: the update's L2 norm before clipping, sent masked when the group asks for norms
    (``spec.norm_cap``), so that the server can set the next groups' clip from the mean norm.
    """
    if flat.size != spec.n:
        raise SecAggError(f"update of {flat.size} values, group expects {spec.n}")
    q = spec.quantizer
    qv = q.quantize(flat[spec.indices()], rng)
    if spec.norm_cap > 0:
        p = min(max(float(norm) / spec.norm_cap, 0.0), 1.0) if np.isfinite(norm) else 1.0
        qv = np.concatenate([qv, (rng.random(NORM_SLOTS) < p).astype(np.int64)])
    b_seed = os.urandom(SEED_BYTES)
    s_sk, _ = keypair_from_seed(s_seed)
    pairs = {j: pairwise_seed(s_sk, pk, spec.group_id) for j, pk in enumerate(spec.s_pks) if j != index}
    v = mask(qv, b_seed=b_seed, pair_seeds=pairs, index=index, bits=q.bits)
    sealed = _seal_all(b_seed, c_sk, spec.c_pks, spec.group_id, b"b", index, spec.t)
    return MaskedUpdate(encode_masked(v, q.bits), sealed, commitment(b_seed)), expand(spec, q.dequantize(qv[:spec.k]))


def expand(spec: GroupSpec, values: np.ndarray) -> np.ndarray:
    """The ``n``-vector ``k`` sent values stand for: scattered on the group's index set."""
    return scatter(spec.indices(), values, spec.n)


def member_reveal(spec: GroupSpec, index: int, c_sk: bytes, sealed_b: Mapping[int, bytes],
                  sealed_s: Mapping[int, bytes], senders: Sequence[int], dropped: Sequence[int]
                  ) -> tuple[dict[int, int], dict[int, int]]:
    """A holder's answer to the unmasking: its ``b`` share of every sender, ``s`` share of every dropped one.

    ``sealed_b`` / ``sealed_s``: dealer index -> the share the dealer sealed for this holder (relayed by the
    server). Refuses (:class:`SecAggError`) a request naming a member both sender and dropped (both secrets
    of one member unmask its update alone) or with fewer than :data:`MIN_GROUP` senders.
    """
    if set(senders) & set(dropped):
        raise SecAggError(f"members {sorted(set(senders) & set(dropped))} named both sender and dropped")
    if len(set(senders)) < MIN_GROUP:
        raise SecAggError(f"{len(set(senders))} sender(s): a sum of fewer than {MIN_GROUP} is an update alone")
    b_out = {i: open_share(share_key(c_sk, spec.c_pks[i], spec.group_id), spec.group_id, b"b", i, index,
                           sealed_b[i]) for i in senders}
    s_out = {j: open_share(share_key(c_sk, spec.c_pks[j], spec.group_id), spec.group_id, b"s", j, index,
                           sealed_s[j]) for j in dropped}
    return b_out, s_out


def server_unmask(spec: GroupSpec, commits_s: Sequence[bytes], uploads: Mapping[int, MaskedUpdate],
                  answers: Mapping[int, tuple[Mapping[int, int], Mapping[int, int]]]) -> np.ndarray:
    """The float sum of the senders' updates (length ``n``): :func:`server_unmask_norm` without the norm."""
    return server_unmask_norm(spec, commits_s, uploads, answers)[0]


def server_unmask_norm(spec: GroupSpec, commits_s: Sequence[bytes], uploads: Mapping[int, MaskedUpdate],
                       answers: Mapping[int, tuple[Mapping[int, int], Mapping[int, int]]]) -> tuple[np.ndarray, float]:
    """The float sum of the senders' updates (length ``n``) from their uploads and the holders' answers, and
    the senders' mean update norm (``nan`` when the group did not ask for norms).

    ``answers``: holder index -> (``b`` shares by sender, ``s`` shares by dropped member). Every secret is
    rebuilt from the shares (all answers must agree) and checked against its dealer's commitment, then the
    sum must lie in the range honest values make. Raises :class:`SecAggError` (the group is discarded) when
    fewer than ``t`` holders answered, a share is inconsistent, a rebuilt secret misses its commitment, or
    the sum is out of range (a member masked with something else than what it shared).
    """
    senders = sorted(uploads)
    if len(senders) < MIN_GROUP:
        raise SecAggError(f"{len(senders)} sender(s) in the group: never unmasked alone")
    dropped = [j for j in range(spec.size) if j not in uploads]
    if len(answers) < spec.t:
        raise SecAggError(f"{len(answers)} holders answered, {spec.t} needed")
    q = spec.quantizer
    masked = {i: decode_masked(uploads[i].payload, spec.values, q.bits) for i in senders}
    b_seeds: dict[int, bytes] = {}
    for i in senders:
        b = shamir_combine({h + 1: a[0][i] for h, a in answers.items() if i in a[0]}, spec.t)
        if commitment(b) != uploads[i].commit_b:
            raise SecAggError(f"member {i}'s self-mask shares do not rebuild its committed seed")
        b_seeds[i] = b
    pairs: dict[tuple[int, int], bytes] = {}
    for j in dropped:
        s_seed = shamir_combine({h + 1: a[1][j] for h, a in answers.items() if j in a[1]}, spec.t)
        if commitment(s_seed) != commits_s[j]:
            raise SecAggError(f"member {j}'s key shares do not rebuild its committed key")
        s_sk, s_pk = keypair_from_seed(s_seed)
        if s_pk != spec.s_pks[j]:
            raise SecAggError(f"member {j}'s key seed does not make the public key it announced")
        for i in senders:
            pairs[(i, j)] = pairwise_seed(s_sk, spec.s_pks[i], spec.group_id)
    total = unmask_sum(masked, b_seeds=b_seeds, dropped_pairs=pairs, bits=q.bits)
    if not in_range(total, len(senders), q):
        raise SecAggError("unmasked sum out of range: a member masked with something else than it shared")
    mean_norm = float("nan")
    if spec.norm_cap > 0:
        ones = total[spec.k:]
        if np.any(ones < 0) or np.any(ones > len(senders)):
            raise SecAggError("unmasked norm slots out of range: a member sent something else than 0 or 1")
        mean_norm = float(ones.sum()) / (NORM_SLOTS * len(senders)) * spec.norm_cap
    return expand(spec, q.dequantize(total[:spec.k])), mean_norm
