"""The aggregator's state (global state, version, buffer, server optimizer, counters, history) and its checkpoints.

:class:`AggregatorState` is a plain class: the ServerApp runs it as a Ray actor (:func:`start_actor`) so the
state lives in the cluster, apart from the loop that talks to Flower, and unit tests use it directly.
Every update goes through :meth:`AggregatorState.submit`, which validates it (:mod:`fedge.cloud.validation`),
buffers it and, after ``K`` accepted updates, produces a new version (:mod:`fedge.cloud.aggregation`).

Checkpoints and the write-ahead log are :mod:`fedge.cloud.durability`: the state is written every
``checkpoint_every`` versions and on shutdown, every accepted update is logged (``fsync``) before
:meth:`AggregatorState.submit` returns, and :meth:`AggregatorState.restore` reads the checkpoint back and submits
the logged updates again (the same checks on the same state give the same versions).

What a client cannot be trusted with is bounded by default (:mod:`fedge.cloud.robust`): example counts are capped
relative to the recent claims, norms clipped relative to the recent accepted norms, a base version other
than the one the server dispatched to that node is refused, and so is a payload already accepted.

The ServerApp joins Ray with :func:`fedge.cloud.ray_cluster.ensure_ray` and runs the state as a named actor
(:func:`start_actor`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import aggregation as agg
from . import robust as rb
from .durability import (
    CHECKPOINT_NAME,
    FORMAT,
    WAL_NAME,
    CheckpointError,
    append_wal,
    load_checkpoint,
    read_checkpoint,
    read_wal,
    section,
    write_checkpoint,
)
from .ray_cluster import RAY_ADDRESS_ENV, RAY_ADDRESS_FILE, ensure_ray
from .validation import RawUpdate, Reason, RejectionCounter, UpdateRejected, validate

__all__ = [
    "ACTOR_NAME",
    "CHECKPOINT_NAME",
    "FORMAT",
    "RAY_ADDRESS_ENV",
    "RAY_ADDRESS_FILE",
    "WAL_NAME",
    "AggregatorState",
    "CheckpointError",
    "ensure_ray",
    "read_wal",
    "start_actor",
]

ACTOR_NAME = "fedge-aggregator"  # ray.get_actor(ACTOR_NAME).rebase.remote(base_state, base_version)


class AggregatorState:
    """Global adapters + version + FedBuff buffer + server optimizer state + counters + version history.

    Parameters
    ----------
    initial:
        The initial global adapters (name -> array); also what :meth:`rebase` resets to.
    buffer_size, staleness, staleness_a, staleness_b, max_staleness, server_opt, server_lr, beta1, beta2, tau,
    max_norm,
    norm_action, robust, trim_ratio, norm_factor, norm_warmup, examples_factor, max_examples, window,
    outlier_threshold, min_cosine, replay_window:
        See :class:`fedge.common.config.AggregationConfig`.
    checkpoint_dir:
        Where checkpoints go (``None``: no checkpoints).
    checkpoint_every:
        Write a checkpoint after every this many versions.
    """

    def __init__(
        self,
        initial: Mapping[str, np.ndarray],
        *,
        buffer_size: int = 4,
        staleness: str = "sqrt",
        staleness_a: float = 0.5,
        staleness_b: int = 4,
        max_staleness: int = 10,
        server_opt: str = "sgd",
        server_lr: float = 1.0,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        max_norm: float = 100.0,
        norm_action: str = "clip",
        robust: str = "none",
        trim_ratio: float = 0.1,
        norm_factor: float = 2.0,
        norm_warmup: int = 4,
        examples_factor: float = 2.0,
        max_examples: float = 0.0,
        window: int = 32,
        outlier_threshold: float = 2.0,
        min_cosine: float = -1.0,
        replay_window: int = 4096,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 5,
    ) -> None:
        self.opts: dict[str, Any] = {
            "buffer_size": buffer_size, "staleness": staleness, "staleness_a": staleness_a,
            "staleness_b": staleness_b, "max_staleness": max_staleness, "server_opt": server_opt,
            "server_lr": server_lr, "beta1": beta1, "beta2": beta2, "tau": tau, "max_norm": max_norm, "norm_action": norm_action,
            "robust": robust, "trim_ratio": trim_ratio, "norm_factor": norm_factor, "norm_warmup": norm_warmup,
            "examples_factor": examples_factor, "max_examples": max_examples, "window": window,
            "outlier_threshold": outlier_threshold, "min_cosine": min_cosine, "replay_window": replay_window,
        }
        self.initial = {k: np.array(v, dtype=np.float32) for k, v in sorted(initial.items())}
        self.params = {k: v.copy() for k, v in self.initial.items()}
        self.opt_state: agg.OptState = {}  # the server optimizer's slots (m, v), reset by a rebase
        self.version = 0
        self.oldest_version = 0  # first version on the current base
        self.base_version = 0  # which base model the adapters belong to (global training rebases it)
        self.base_state: dict[str, np.ndarray] | None = None
        # {"delta", "staleness", "num_examples", "base_version", "norm"}
        self.buffer: list[dict[str, Any]] = []
        # what recently accepted updates looked like: the reference of the relative bounds (cloud/robust.py)
        self.recent_norms: deque[float] = deque(maxlen=window)
        self.recent_claims: deque[float] = deque(maxlen=window)
        filtering = outlier_threshold > 0 or min_cosine > -1
        self.recent_deltas: deque[dict[str, np.ndarray]] = deque(maxlen=window if filtering else 0)
        self.replays = rb.ReplayGuard(replay_window)
        self.rejections = RejectionCounter()
        self.accepted = 0
        self.clipped = 0
        self.outliers = 0  # accepted updates left out of their version as outliers
        self.bytes_accepted = 0
        self.history: list[dict[str, Any]] = [{"version": 0, "time": 0.0, "updates": 0, "base_version": 0}]
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.last_checkpoint_version = -1
        self._replaying = False
        self.replayed = 0  # updates restore() took from the write-ahead log

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> tuple[int, dict[str, np.ndarray]]:
        """The current version and a copy of the global adapters."""
        return self.version, {k: v.copy() for k, v in self.params.items()}

    def get_version(self) -> int:
        return self.version

    def stats(self) -> dict[str, Any]:
        """Counters for logs and metrics."""
        return {
            "version": self.version,
            "accepted": self.accepted,
            "clipped": self.clipped,
            "outliers": self.outliers,
            "buffered": len(self.buffer),
            "rejected": self.rejections.total,
            "rejections": self.rejections.as_dict(),
            "bytes_accepted": self.bytes_accepted,
            "base_version": self.base_version,
            "last_checkpoint_version": self.last_checkpoint_version,
        }

    def get_base(self) -> tuple[int, dict[str, np.ndarray] | None]:
        """``(base_version, base_state)``; the state is ``None`` until a global training rebased."""
        return self.base_version, self.base_state

    def get_history(self) -> list[dict[str, Any]]:
        return [dict(h) for h in self.history]

    # ------------------------------------------------------------------ writing
    def reject(self, reason: str) -> None:
        """Count an update lost outside validation (a reply error, a timeout, a node that left)."""
        self.rejections.add(Reason(reason))

    def submit(self, raw: RawUpdate, now: float = 0.0, dispatched_version: int | None = None) -> dict[str, Any]:
        """Validate one update and buffer it; aggregate when the buffer holds ``K``.

        ``dispatched_version`` is the version the server sent to the node (``None``: not known, the claim
        is taken). An accepted update is in the write-ahead log (fsync'd) before this returns.
        Returns ``{"accepted", "reason", "detail", "staleness", "new_version"}`` (``new_version`` is the
        version produced by this update, else ``None``). Never raises on a bad update: it is counted.
        """
        o = self.opts
        try:
            digest = rb.payload_digest(raw.payload)
            if digest in self.replays:
                raise UpdateRejected(Reason.REPLAY, f"payload {digest[:12]} was accepted before")
            upd = validate(raw, reference=self.params, current_version=self.version,
                           oldest_version=self.oldest_version, max_staleness=o["max_staleness"],
                           max_norm=o["max_norm"], norm_action=o["norm_action"],
                           dispatched_version=dispatched_version)
        except UpdateRejected as e:
            self.rejections.add(e.reason)
            return {"accepted": False, "reason": e.reason.value, "detail": e.detail,
                    "staleness": self.version - raw.base_version, "new_version": None}
        except Exception as e:  # noqa: BLE001 - a hostile update must never take the loop down
            self.rejections.add(Reason.INVALID)
            return {"accepted": False, "reason": Reason.INVALID.value, "detail": f"{type(e).__name__}: {e}",
                    "staleness": self.version - raw.base_version, "new_version": None}
        # max_norm (with norm_action) bounds every update; the bound relative to the recent norms clips only, so
        # an honest update a little larger than usual still counts
        delta, clipped = upd.delta, upd.clipped
        bound = rb.norm_bound(self.recent_norms, factor=o["norm_factor"], warmup=o["norm_warmup"],
                              max_norm=o["max_norm"])
        if upd.norm > bound:
            delta, _ = agg.clip_by_norm(delta, bound)
            clipped = True
        try:
            self._log(raw, now, dispatched_version)
        except OSError as e:  # not durable, so not accepted: the node's update is refused, the loop goes on
            self.rejections.add(Reason.INVALID)
            return {"accepted": False, "reason": Reason.INVALID.value, "detail": f"write-ahead log: {e}",
                    "staleness": upd.staleness, "new_version": None}
        self.accepted += 1
        self.replays.add(digest)
        self.recent_norms.append(upd.norm)
        self.clipped += int(clipped)
        self.bytes_accepted += upd.upload_bytes
        self.buffer.append({"delta": delta, "staleness": upd.staleness, "num_examples": upd.num_examples,
                            "base_version": upd.base_version, "norm": upd.norm, "clipped": clipped})
        new_version = self.aggregate(now) if len(self.buffer) >= o["buffer_size"] else None
        return {"accepted": True, "reason": None, "detail": "", "staleness": upd.staleness,
                "new_version": new_version}

    def aggregate(self, now: float = 0.0) -> int | None:
        """Apply the buffer (whatever it holds) as a new version; ``None`` when it is empty."""
        if not self.buffer:
            return None
        o = self.opts
        buf, self.buffer = self.buffer, []
        # the norm bound again, now that the buffer's own norms count: during the warm-up (no bound at submit)
        # the median of the first buffer still holds a minority of huge updates to the honest scale
        bound = rb.norm_bound(self.recent_norms, factor=o["norm_factor"], warmup=1, max_norm=o["max_norm"])
        for b in buf:
            if agg.global_norm(b["delta"]) > bound:
                b["delta"], _ = agg.clip_by_norm(b["delta"], bound)
                self.clipped += int(not b.get("clipped", False))
        kept = buf
        if o["outlier_threshold"] > 0 or o["min_cosine"] > -1:
            deltas, window = [b["delta"] for b in buf], list(self.recent_deltas)
            keep = np.ones(len(buf), dtype=bool)
            if o["outlier_threshold"] > 0:
                keep &= rb.outlier_scores(deltas, window) <= o["outlier_threshold"]
            if o["min_cosine"] > -1:
                keep &= rb.cosine_to_reference(deltas, window) >= o["min_cosine"]
            kept = [b for b, k in zip(buf, keep) if k] or buf
            self.outliers += len(buf) - len(kept)
            self.recent_deltas.extend(b["delta"] for b in kept)
        claims = [b["num_examples"] for b in kept]
        weights = rb.capped_examples(claims, self.recent_claims, factor=o["examples_factor"],
                                     max_examples=o["max_examples"])
        self.recent_claims.extend(claims)
        delta = agg.fedbuff_delta(
            [b["delta"] for b in kept], [b["staleness"] for b in kept], weights,
            fn=o["staleness"], a=o["staleness_a"], b=o["staleness_b"], robust=o["robust"],
            trim_ratio=o["trim_ratio"],
        )
        self.params, self.opt_state = agg.server_opt_step(
            self.params, delta, self.opt_state, opt=o["server_opt"], lr=o["server_lr"], beta1=o["beta1"],
            beta2=o["beta2"], tau=o["tau"])
        self.version += 1
        self.history.append({
            "version": self.version, "time": float(now), "updates": len(buf),
            "mean_staleness": float(np.mean([b["staleness"] for b in buf])),
            "max_staleness": int(max(b["staleness"] for b in buf)), "base_version": self.base_version,
        })
        if self.checkpoint_dir and self.version % self.checkpoint_every == 0 and not self._replaying:
            self.checkpoint()
        return self.version

    def apply_sum(self, delta: Mapping[str, np.ndarray], staleness: list[int], now: float = 0.0,
                  upload_bytes: int = 0) -> int:
        """Secure aggregation: apply a group's unmasked mean update as a new version (no per-update checks).

        The server never sees the group's updates one by one, so the robust filters and the relative norm
        bound cannot run; the devices clipped before masking and the group sum was range-checked. The mean
        gets one staleness weight, the mean of its members' ``w(s_i)``.
        """
        o = self.opts
        w = float(np.mean([agg.staleness_weight(s, fn=o["staleness"], a=o["staleness_a"], b=o["staleness_b"])
                           for s in staleness]))
        scaled = {k: np.asarray(v, np.float32) * np.float32(w) for k, v in delta.items()}
        self.params, self.opt_state = agg.server_opt_step(
            self.params, scaled, self.opt_state, opt=o["server_opt"], lr=o["server_lr"], beta1=o["beta1"],
            beta2=o["beta2"], tau=o["tau"])
        self.accepted += len(staleness)
        self.bytes_accepted += int(upload_bytes)
        self.version += 1
        self.history.append({"version": self.version, "time": float(now), "updates": len(staleness),
                             "mean_staleness": float(np.mean(staleness)), "max_staleness": int(max(staleness)),
                             "base_version": self.base_version, "secure": True})
        if self.checkpoint_dir and self.version % self.checkpoint_every == 0:
            self.checkpoint()
        return self.version

    def rebase(self, base_state: Mapping[str, np.ndarray], base_version: int,
               adapters: Mapping[str, np.ndarray] | None = None) -> int:
        """Replace the base model (global training merged adapters and trained the base).

        Produces a new version whose adapters are reset (to ``adapters`` or the initial adapters); updates
        trained on any earlier version are then refused as ``unknown_version`` (they belong to the old
        base), the buffer and the server optimizer state are cleared, and version numbers stay monotonic so staleness keeps
        its meaning. Returns the new version.
        """
        if base_version <= self.base_version:
            raise ValueError(f"base_version must increase: {base_version} <= {self.base_version}")
        reset = self.initial if adapters is None else adapters
        if set(reset) != set(self.params) or any(np.shape(reset[k]) != self.params[k].shape for k in reset):
            raise ValueError("rebase adapters must have the global adapters' names and shapes")
        self.base_state = {k: np.array(v, dtype=np.float32) for k, v in base_state.items()}
        self.base_version = int(base_version)
        self.params = {k: np.array(reset[k], dtype=np.float32) for k in sorted(reset)}
        self.opt_state = {}
        dropped = len(self.buffer)
        self.buffer = []
        self.version += 1
        self.oldest_version = self.version
        self.history.append({"version": self.version, "time": float("nan"), "updates": 0,
                             "base_version": self.base_version, "rebase": True, "dropped_buffer": dropped})
        if self.checkpoint_dir:
            self.checkpoint()
        return self.version

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> str | None:
        """Write the whole state atomically; return the path (``None`` without a checkpoint dir)."""
        if not self.checkpoint_dir:
            return None
        path = write_checkpoint(self, Path(self.checkpoint_dir))
        self.last_checkpoint_version = self.version
        return str(path)

    def _log(self, raw: RawUpdate, now: float, dispatched_version: int | None) -> None:
        """Append an accepted update (sequence number: ``accepted`` after it) to the write-ahead log, fsync'd."""
        if not self.checkpoint_dir or self._replaying:
            return
        d = Path(self.checkpoint_dir)
        if self.last_checkpoint_version < 0 and not (d / CHECKPOINT_NAME).is_file():
            self.checkpoint()  # the log replays onto a checkpoint: the first update needs the initial one
        meta = {"seq": self.accepted + 1, "base_version": raw.base_version, "metrics": raw.metrics,
                "dispatched_version": dispatched_version, "now": now}
        append_wal(d / WAL_NAME, meta, raw.payload)

    def _replay_log(self) -> int:
        """Submit again the logged updates that the checkpoint does not hold; return how many."""
        assert self.checkpoint_dir
        records = read_wal(Path(self.checkpoint_dir) / WAL_NAME)
        self._replaying = True
        n = 0
        try:
            for meta, payload in records:
                if int(meta["seq"]) <= self.accepted:
                    continue  # already in the checkpoint (a crash between checkpoint and truncation)
                raw = RawUpdate(payload=payload, base_version=int(meta["base_version"]),
                                metrics={str(k): float(v) for k, v in meta["metrics"].items()})
                self.submit(raw, float(meta["now"]), meta["dispatched_version"])
                n += 1
        finally:
            self._replaying = False
        if n:
            self.checkpoint()
        return n

    @classmethod
    def restore(cls, checkpoint_dir: str, *, checkpoint_every: int = 5, **opts: Any) -> AggregatorState:
        """Rebuild the state from ``checkpoint_dir``; ``opts`` (aggregation options) override the saved ones.

        Raises
        ------
        FileNotFoundError
            When there is no checkpoint.
        CheckpointError
            When it is unreadable.
        """
        header, data = read_checkpoint(checkpoint_dir)
        st = cls(section(data, "initial/"), **{**header["opts"], **opts}, checkpoint_dir=checkpoint_dir,
                 checkpoint_every=checkpoint_every)
        load_checkpoint(st, header, data)
        st.last_checkpoint_version = st.version
        st.replayed = st._replay_log()
        return st


def start_actor(state: AggregatorState | None = None, *, name: str = ACTOR_NAME, **kwargs: Any) -> Any:
    """Run an :class:`AggregatorState` as a named Ray actor (0 CPUs: it must not take a simulated node's slot).

    Pass a built ``state`` (e.g. from :meth:`AggregatorState.restore`, shipped to the actor) or the
    constructor's keyword arguments. Other jobs on the cluster reach it with ``ray.get_actor(name)``
    (global training calls ``rebase``); a leftover actor of that name (a crashed server's) is replaced.
    """
    import ray

    try:
        ray.kill(ray.get_actor(name))
    except ValueError:
        pass
    actor_cls = ray.remote(num_cpus=0)(_ActorState)  # one call at a time: updates apply in order
    return actor_cls.options(name=name).remote(state, kwargs)


class _ActorState(AggregatorState):
    """Actor wrapper: built from an existing state object or from constructor keywords."""

    def __init__(self, state: AggregatorState | None, kwargs: dict[str, Any]) -> None:
        if state is not None:
            self.__dict__.update(state.__dict__)
        else:
            super().__init__(**kwargs)
