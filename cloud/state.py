"""The aggregator's state (global adapters, version, buffer, momentum, counters, history) and its checkpoints.

:class:`AggregatorState` is a plain class: the ServerApp runs it as a Ray actor (:func:`start_actor`) so the
state lives in the cluster, apart from the loop that talks to Flower, and unit tests use it directly.
Every update goes through :meth:`AggregatorState.submit`, which validates it (:mod:`cloud.validation`),
buffers it and, after ``K`` accepted updates, produces a new version (:mod:`cloud.aggregation`).

Checkpoints are one ``.npz`` file (arrays + a JSON header) written atomically: a temporary file in the
same directory, ``fsync``, ``os.replace``, ``fsync`` of the directory. A checkpoint holds the buffer too,
so no update accepted before it is lost on a crash. It is written every ``checkpoint_every`` versions and
on shutdown; :meth:`AggregatorState.restore` reads it back.

Ray: in a simulation (Flower's ``run_simulation`` or a ``--simulation`` SuperLink) the simulation engine
starts Ray in the ServerApp's own process; :func:`ensure_ray` joins it. In deployment the ServerApp process
joins the cluster named by ``$FEDGE_RAY_ADDRESS`` (``fedge cloud start`` sets it to its embedded Ray or to
``--ray-address``), or else starts a local Ray.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import aggregation as agg
from .validation import RawUpdate, Reason, RejectionCounter, UpdateRejected, validate

CHECKPOINT_NAME = "aggregator.npz"
FORMAT = 1
RAY_ADDRESS_ENV = "FEDGE_RAY_ADDRESS"
ACTOR_NAME = "fedge-aggregator"  # ray.get_actor(ACTOR_NAME).rebase.remote(base_state, base_version)
RAY_ADDRESS_FILE = "ray-address"  # in the run dir, written by `fedge cloud start` on every start


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or does not match this run."""


class AggregatorState:
    """Global adapters + version + FedBuff buffer + server momentum + counters + version history.

    Parameters
    ----------
    initial:
        The initial global adapters (name -> array); also what :meth:`rebase` resets to.
    buffer_size, staleness, staleness_a, staleness_b, max_staleness, server_lr, server_momentum, max_norm,
    norm_action, robust, trim_ratio:
        See :class:`common.config.AggregationConfig`.
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
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        max_norm: float = 100.0,
        norm_action: str = "clip",
        robust: str = "none",
        trim_ratio: float = 0.1,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 5,
    ) -> None:
        self.opts: dict[str, Any] = {
            "buffer_size": buffer_size, "staleness": staleness, "staleness_a": staleness_a,
            "staleness_b": staleness_b, "max_staleness": max_staleness, "server_lr": server_lr,
            "server_momentum": server_momentum, "max_norm": max_norm, "norm_action": norm_action,
            "robust": robust, "trim_ratio": trim_ratio,
        }
        self.initial = {k: np.array(v, dtype=np.float32) for k, v in sorted(initial.items())}
        self.params = {k: v.copy() for k, v in self.initial.items()}
        self.momentum: dict[str, np.ndarray] | None = None
        self.version = 0
        self.oldest_version = 0  # first version on the current base
        self.base_version = 0  # which base model the adapters belong to (issue 6 rebases)
        self.base_state: dict[str, np.ndarray] | None = None
        self.buffer: list[dict[str, Any]] = []  # {"delta", "staleness", "num_examples", "base_version"}
        self.rejections = RejectionCounter()
        self.accepted = 0
        self.clipped = 0
        self.bytes_accepted = 0
        self.history: list[dict[str, Any]] = [{"version": 0, "time": 0.0, "updates": 0, "base_version": 0}]
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.last_checkpoint_version = -1

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

    def submit(self, raw: RawUpdate, now: float = 0.0) -> dict[str, Any]:
        """Validate one update and buffer it; aggregate when the buffer holds ``K``.

        Returns ``{"accepted", "reason", "detail", "staleness", "new_version"}`` (``new_version`` is the
        version produced by this update, else ``None``). Never raises on a bad update: it is counted.
        """
        o = self.opts
        try:
            upd = validate(raw, reference=self.params, current_version=self.version,
                           oldest_version=self.oldest_version, max_staleness=o["max_staleness"],
                           max_norm=o["max_norm"], norm_action=o["norm_action"])
        except UpdateRejected as e:
            self.rejections.add(e.reason)
            return {"accepted": False, "reason": e.reason.value, "detail": e.detail,
                    "staleness": self.version - raw.base_version, "new_version": None}
        except Exception as e:  # noqa: BLE001 - a hostile update must never take the loop down
            self.rejections.add(Reason.INVALID)
            return {"accepted": False, "reason": Reason.INVALID.value, "detail": f"{type(e).__name__}: {e}",
                    "staleness": self.version - raw.base_version, "new_version": None}
        self.accepted += 1
        self.clipped += int(upd.clipped)
        self.bytes_accepted += upd.upload_bytes
        self.buffer.append({"delta": upd.delta, "staleness": upd.staleness, "num_examples": upd.num_examples,
                            "base_version": upd.base_version})
        new_version = self.aggregate(now) if len(self.buffer) >= o["buffer_size"] else None
        return {"accepted": True, "reason": None, "detail": "", "staleness": upd.staleness,
                "new_version": new_version}

    def aggregate(self, now: float = 0.0) -> int | None:
        """Apply the buffer (whatever it holds) as a new version; ``None`` when it is empty."""
        if not self.buffer:
            return None
        o = self.opts
        buf, self.buffer = self.buffer, []
        delta = agg.fedbuff_delta(
            [b["delta"] for b in buf], [b["staleness"] for b in buf], [b["num_examples"] for b in buf],
            fn=o["staleness"], a=o["staleness_a"], b=o["staleness_b"], robust=o["robust"],
            trim_ratio=o["trim_ratio"],
        )
        self.params, self.momentum = agg.server_step(self.params, delta, self.momentum, lr=o["server_lr"],
                                                     beta=o["server_momentum"])
        self.version += 1
        self.history.append({
            "version": self.version, "time": float(now), "updates": len(buf),
            "mean_staleness": float(np.mean([b["staleness"] for b in buf])),
            "max_staleness": int(max(b["staleness"] for b in buf)), "base_version": self.base_version,
        })
        if self.checkpoint_dir and self.version % self.checkpoint_every == 0:
            self.checkpoint()
        return self.version

    def rebase(self, base_state: Mapping[str, np.ndarray], base_version: int,
               adapters: Mapping[str, np.ndarray] | None = None) -> int:
        """Replace the base model (issue 6: global training merged adapters and trained the base).

        Produces a new version whose adapters are reset (to ``adapters`` or the initial adapters); updates
        trained on any earlier version are then refused as ``unknown_version`` (they belong to the old
        base), the buffer and momentum are cleared, and version numbers stay monotonic so staleness keeps
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
        self.momentum = None
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
        d = Path(self.checkpoint_dir)
        d.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        for k, v in self.params.items():
            arrays[f"params/{k}"] = v
        for k, v in self.initial.items():
            arrays[f"initial/{k}"] = v
        for k, v in (self.momentum or {}).items():
            arrays[f"momentum/{k}"] = v
        for k, v in (self.base_state or {}).items():
            arrays[f"base/{k}"] = v
        for i, b in enumerate(self.buffer):
            for k, v in b["delta"].items():
                arrays[f"buffer/{i}/{k}"] = v
        header = {
            "format": FORMAT, "version": self.version, "oldest_version": self.oldest_version,
            "base_version": self.base_version, "opts": self.opts,
            "buffer": [{k: b[k] for k in ("staleness", "num_examples", "base_version")} for b in self.buffer],
            "rejections": self.rejections.as_dict(), "accepted": self.accepted, "clipped": self.clipped,
            "bytes_accepted": self.bytes_accepted, "history": self.history,
            "has_momentum": self.momentum is not None, "has_base": self.base_state is not None,
        }
        arrays["__header__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        bio = io.BytesIO()
        np.savez(bio, **arrays)  # type: ignore[arg-type]
        atomic_write(d / CHECKPOINT_NAME, bio.getvalue())
        self.last_checkpoint_version = self.version
        return str(d / CHECKPOINT_NAME)

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
        path = Path(checkpoint_dir) / CHECKPOINT_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no aggregator checkpoint at {path}")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            header = json.loads(bytes(data.pop("__header__")).decode())
        except Exception as e:  # noqa: BLE001 - any parse failure is the same refusal
            raise CheckpointError(f"checkpoint {path} unreadable: {e}") from None
        if header.get("format") != FORMAT:
            raise CheckpointError(f"checkpoint {path}: unknown format {header.get('format')}")

        def section(prefix: str) -> dict[str, np.ndarray]:
            return {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}

        st = cls(section("initial/"), **{**header["opts"], **opts}, checkpoint_dir=checkpoint_dir,
                 checkpoint_every=checkpoint_every)
        st.params = section("params/")
        st.momentum = section("momentum/") if header["has_momentum"] else None
        st.base_state = section("base/") if header["has_base"] else None
        st.version, st.oldest_version = int(header["version"]), int(header["oldest_version"])
        st.base_version = int(header["base_version"])
        st.buffer = [{**meta, "delta": section(f"buffer/{i}/")} for i, meta in enumerate(header["buffer"])]
        st.rejections = RejectionCounter(dict(header["rejections"]))
        st.accepted, st.clipped = int(header["accepted"]), int(header["clipped"])
        st.bytes_accepted = int(header["bytes_accepted"])
        st.history = list(header["history"])
        st.last_checkpoint_version = st.version
        return st


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old or the new file, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ---------------------------------------------------------------------------------------------- Ray
def ensure_ray(*, wait_for_simulation_s: float = 0.0, num_cpus: int | None = None,
               run_dir: str | Path | None = None) -> str:
    """Make sure this process is connected to Ray; return how (``existing``, ``address``, ``local``).

    With ``wait_for_simulation_s > 0`` (a ServerApp inside Flower's simulation engine, which starts Ray in
    this very process shortly after the nodes register) wait that long for it rather than starting a
    second Ray. Otherwise join the address in ``run_dir/ray-address`` (written by ``fedge cloud start``),
    else ``$FEDGE_RAY_ADDRESS``, else start a local Ray.
    """
    import ray

    t0 = time.monotonic()
    while not ray.is_initialized() and time.monotonic() - t0 < wait_for_simulation_s:
        time.sleep(0.2)
    if ray.is_initialized():
        return "existing"
    f = Path(run_dir) / RAY_ADDRESS_FILE if run_dir else None
    addr = f.read_text().strip() if f is not None and f.is_file() else os.environ.get(RAY_ADDRESS_ENV, "")
    if addr:
        ray.init(address=addr, ignore_reinit_error=True, log_to_driver=False)
        return "address"
    ray.init(ignore_reinit_error=True, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return "local"


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
