"""The cloud ServerApp on Flower's Grid: asynchronous buffered aggregation (FedBuff), synchronous FedAvg alike.

The loop keeps up to ``C`` nodes training (``grid.push_messages``); each TRAIN carries the global adapters,
their version and the round config (:mod:`common.wire`). Replies are pulled as they arrive
(``grid.pull_messages``, matched by ``reply_to_message_id``), ordered by the clock (:mod:`cloud.clock`:
virtual under simulation, real in deployment) and submitted to the aggregator state, a Ray actor
(:mod:`cloud.state`) that validates each update and makes a new version after ``K`` accepted ones. An idle
node gets the newest version at once; node ids are re-read every pass, so nodes that join are used and
nodes that leave free their slot; a node that does not answer within ``aggregation.reply_timeout_s`` is
given up and its slot reused. The global adapters are evaluated on held-back data every
``aggregation.eval_every`` versions: one ``[fedge] version N accuracy ...`` line and one ``metrics.jsonl``
record each. Sync mode (FedAvg) is the same loop with a barrier: ``C`` = ``K`` = nodes per round.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from common import secagg as sa
from common import wire
from common.base_weights import load_base_file, published_store, save_base
from common.config import FedgeConfig, config_from_context, default_run_dir
from common.dataset import load_data
from common.lora import apply_lora, base_state, load_base_state
from common.manifest import generate_keypair
from common.model import MultimodalMoE, build_model, model_kwargs
from common.scope import load_trainable_state, trainable_state
from common.training import evaluate

from . import clock as clk
from .aggregation import default_server_lr
from .dashboard import LiveState
from .dashboard.watch import watch
from .secure_buffer import Group, SecureGroups, group_mean
from .state import AggregatorState, ensure_ray, start_actor
from .validation import Reason, UpdateRejected, extract

log = logging.getLogger("fedge.server")
app = ServerApp()

CHECKPOINT_SUBDIR = "checkpoints"
BASES_SUBDIR = "bases"  # a copy of each published base, for `fedge evaluate RUN_DIR` (common/evaluate_cli.py)


def global_model(cfg: FedgeConfig) -> MultimodalMoE:
    """The global model: the base (the seed's init, or ``model.base_path``) with LoRA applied, as on devices."""
    m = build_model(**model_kwargs(cfg))  # type: ignore[arg-type]
    apply_lora(m, rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha)
    if cfg.model.base_path:
        load_base_file(m, cfg.model.base_path)
    return m


def heldout_data(cfg: FedgeConfig) -> dict[str, np.ndarray] | None:
    """The held-out evaluation set ``data.eval_path`` (a SampleStore directory or an NPZ), or None without one.

    There is no fallback to generated data: a score on a task the devices do not learn would say nothing.

    Raises
    ------
    common.dataset.DataError
        The set cannot be read, does not fit the model, or has a label outside the model's classes.
    """
    if not cfg.data.eval_path:
        return None
    m = cfg.model
    return load_data(cfg.data.eval_path, image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames,
                     num_classes=m.num_classes, what="data.eval_path")


NO_EVAL = "no evaluation set (data.eval_path is empty): versions are reported without accuracy"


def is_simulation(grid: Grid) -> bool:
    """Whether the Grid is Flower's simulation engine (in-memory, Ray started in this process)."""
    return type(grid).__name__ == "InMemoryGrid"


@dataclass
class _Slot:
    """One TRAIN message in flight."""

    node_id: int
    version: int
    dispatch_t: float  # clock time (virtual or real)
    dispatch_wall: float  # time.monotonic()
    index: int  # dispatch counter (seeds, dropout draws)
    download_bytes: int


@dataclass
class _Event:
    """A reply released by the clock: an update to submit, or a loss to count."""

    slot: _Slot
    raw: Any = None  # validation.RawUpdate
    reason: str | None = None  # a rejection found before the state (reply error, malformed, lost)
    detail: str = ""
    content: Any = None  # the reply's records (secure aggregation: the sealed shares)


@dataclass
class _VersionAcc:
    """What went into the versions since the last metrics record."""

    updates: int = 0
    upload_bytes: int = 0
    staleness: list[int] = field(default_factory=list)


class ServerLoop:
    """The aggregation loop; one instance per ServerApp run."""

    def __init__(self, grid: Grid, cfg: FedgeConfig, *, actor: Any, clock: clk.RealClock | clk.VirtualClock,
                 run_dir: Path | None, eval_data: dict[str, np.ndarray] | None, model: MultimodalMoE,
                 num_partitions: int, live: LiveState | None = None) -> None:
        self.grid, self.cfg, self.actor, self.clock = grid, cfg, actor, clock
        # what the dashboard, /metrics, `fedge status` and live TensorBoard read (cloud/dashboard)
        self.live = live or LiveState(mode=cfg.aggregation.mode, buffer_size=_state_kwargs(cfg, None)["buffer_size"],
                                      concurrency=cfg.aggregation.concurrency,
                                      target_versions=cfg.aggregation.versions)
        self.run_dir, self.eval_data, self.model = run_dir, eval_data, model
        self.agg = cfg.aggregation
        self.sync = self.agg.mode == "sync"
        self.queue = clk.ArrivalQueue(clock)
        self.inflight: dict[str, _Slot] = {}
        self.busy: set[int] = set()  # nodes with a TRAIN not yet released by the clock
        self.node_pid: dict[int, int] = {}
        self.num_partitions = num_partitions
        self.rng = np.random.default_rng(cfg.seed)
        self.dispatches = 0
        self.bytes_sent = 0  # accepted upload bytes, cumulative
        self.bytes_down = 0
        self.acc = _VersionAcc()
        self.version, self.params = self._get(self.actor.snapshot.remote())
        self.round_open = False  # sync: a round's messages are out
        self.done = False  # aggregation.stop_at_accuracy reached
        self.nodes: list[int] = []
        self._nodes_read = -math.inf
        # the published base (model store version) the current version's adapters belong to, as devices fetch
        # it; "" = the config's base, which every party builds itself. Global training publishes a new one.
        self.base_model = ""
        self.last_trained = self.version
        base_version, base = self._get(self.actor.get_base.remote())
        publishing = cfg.training.every_versions > 0 or bool(cfg.publish.store) or base is not None
        self.publisher = publisher_for(cfg, run_dir) if publishing else None
        if base is not None:  # resumed after a global training: devices and the evaluation need its base
            self._install_base(base_version, self._publish(base_version, base))
            self.last_trained = self.version
        elif self.publisher is not None:  # devices start from it, so that the next base reaches them as deltas
            self._install_base(0, self._publish(0, {k: v.numpy() for k, v in base_state(self.model).items()}))
        self.poll_s = 0.02 if clock.virtual else 0.25
        self.secure: SecureGroups | None = None  # aggregation.secure: groups unmasked only as sums
        self.layout = sa.flatten(self.params)[1]
        if self.agg.secure:
            n, comm = sum(int(v.size) for v in self.params.values()), cfg.communication
            # top-k survives masking as a count sketch of 1.5 k cells whose sum keeps its k heaviest coordinates
            top = max(1, round(comm.topk_ratio * n)) if comm.compression == "topk" else 0
            k = min(n, round(1.5 * top)) if top else n
            self.secure = SecureGroups(n=n, k=k, clip=self.agg.secure_clip, threshold=self.agg.secure_threshold,
                                       sketch_top=top if k < n else 0)
        self.t_wall0 = time.monotonic()

    @staticmethod
    def _get(ref: Any) -> Any:
        import ray

        return ray.get(ref)

    # ------------------------------------------------------------------ nodes
    def _refresh_nodes(self) -> None:
        now = time.monotonic()
        if now - self._nodes_read < (0.0 if self.clock.virtual else 1.0):
            return
        self._nodes_read = now
        nodes = sorted(int(n) for n in self.grid.get_node_ids())
        if self.clock.virtual:
            self._discover([n for n in nodes if n not in self.node_pid])
            # dispatch order by partition, not by the engine's random node ids: the same seed, the same run
            nodes.sort(key=lambda n: (self.node_pid.get(n, -1) < 0, self.node_pid.get(n, -1), n))
        if nodes != self.nodes:
            self.live.nodes(nodes, self.node_pid)
        self.nodes = nodes
        present = set(self.nodes)
        for mid, slot in list(self.inflight.items()):
            if slot.node_id not in present:
                log.warning("node %d left while training; its update is lost", slot.node_id)
                self._give_up(mid, Reason.NODE_LEFT)

    def _discover(self, nodes: list[int]) -> None:
        """Ask new nodes which simulated device (partition) they are, before any work goes to them.

        Flower's simulation engine gives nodes random ids; the partition id keys the device profile of the
        virtual clock and the dispatch order. A node that does not answer (or is no simulated device) is
        recorded as -1: no profile, dispatched after the others.
        """
        if not nodes:
            return
        msgs = [Message(wire.query_message_content(), dst_node_id=int(n), message_type=MessageType.QUERY)
                for n in nodes]
        for n in nodes:
            self.node_pid[n] = -1
        for reply in self.grid.send_and_receive(msgs, timeout=self.agg.reply_timeout_s):
            if reply.has_error() or wire.METRICS not in reply.content:
                continue
            pid = reply.content.metric_records[wire.METRICS].get(wire.PARTITION_ID, -1)
            self.node_pid[int(reply.metadata.src_node_id)] = int(pid)  # type: ignore[arg-type]

    def _give_up(self, mid: str, reason: Reason) -> None:
        slot = self.inflight.pop(mid)
        self.queue.cancel(mid)
        self.busy.discard(slot.node_id)
        self._get(self.actor.reject.remote(reason.value))
        self.live.refused_update(slot.node_id, reason.value, lost=True)
        self._secure_lost(slot, self.clock.now())

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        for mid, slot in list(self.inflight.items()):
            if now - slot.dispatch_wall > self.agg.reply_timeout_s:
                log.warning("node %d did not answer within %.0f s; slot reused", slot.node_id,
                            self.agg.reply_timeout_s)
                self._give_up(mid, Reason.TIMEOUT)

    # ------------------------------------------------------------------ dispatch
    def _profile(self, node_id: int) -> clk.DeviceProfile | None:
        pid = self.node_pid.get(node_id)
        if pid is None or not 0 <= pid < self.num_partitions:
            return None
        p = self.cfg.profiles
        return clk.device_profile(pid, self.num_partitions, seed=self.cfg.seed, base_step_s=p.base_step_s,
                                  speed_sigma=p.speed_sigma, straggler_fraction=p.straggler_fraction,
                                  straggler_slowdown_min=p.straggler_slowdown_min,
                                  straggler_slowdown_max=p.straggler_slowdown_max,
                                  bandwidth_mbps=p.bandwidth_mbps, bandwidth_sigma=p.bandwidth_sigma,
                                  dropout=p.dropout)

    def _dispatch(self, nodes: list[int], records: dict[int, Any] | None = None) -> list[_Slot]:
        """TRAIN messages to ``nodes`` (``records``: a secure group's record per node); returns their slots."""
        if not nodes:
            return []
        if self._get(self.actor.get_version.remote()) != self.version:  # e.g. a rebase by global training
            self.version, self.params = self._get(self.actor.snapshot.remote())
        t = self.clock.now()
        down = int(sum(v.nbytes for v in self.params.values()))
        msgs, slots = [], []
        for n in nodes:
            rnd = wire.round_record(version=self.version, lr=self.cfg.train.lr,
                                    local_steps=self.cfg.train.local_steps, batch_size=self.cfg.train.batch_size,
                                    local_epochs=self.cfg.train.local_epochs,
                                    seed=self.cfg.seed * 7919 + self.dispatches, base_model=self.base_model)
            content = wire.train_message_content(self.params, rnd)
            if records is not None:
                content[wire.SECAGG] = records[n]
            msgs.append(Message(content, dst_node_id=int(n), message_type=MessageType.TRAIN))
            slots.append(_Slot(node_id=int(n), version=self.version, dispatch_t=t,
                               dispatch_wall=time.monotonic(), index=self.dispatches, download_bytes=down))
            self.dispatches += 1
        for mid, slot in zip(self.grid.push_messages(msgs), slots):
            self.inflight[mid] = slot
            self.busy.add(slot.node_id)
            self.live.dispatched(slot.node_id, slot.version, slot.download_bytes)
            prof = self._profile(slot.node_id) if self.clock.virtual else None
            lb = t if prof is None else t + slot.download_bytes * 8.0 / prof.bandwidth_bps + \
                self._min_steps() * prof.step_s
            self.queue.dispatched(mid, lb)
            self.bytes_down += down
        return slots

    def _fill(self) -> None:
        if self.done or self.version >= self.agg.versions:
            return
        idle = [n for n in self.nodes if n not in self.busy]
        if self.secure is not None:
            self._fill_secure(idle)
            return
        if self.sync:
            if self.round_open or self.queue.inflight or len(self.queue) or not idle:
                return
            k = min(self.agg.concurrency, len(idle))
            chosen = [idle[i] for i in sorted(self.rng.permutation(len(idle))[:k])]  # in partition order
            self.round_open = True
            self._dispatch(chosen)
            return
        free = self.agg.concurrency - len(self.busy)
        if free <= 0 or not idle:
            return
        chosen = [idle[i] for i in self.rng.permutation(len(idle))[: min(free, len(idle))]]
        self._dispatch(chosen)

    def _send(self, msgs: list[Message]) -> list[Message]:
        return list(self.grid.send_and_receive(msgs, timeout=min(self.agg.reply_timeout_s, 120.0)))

    def _fill_secure(self, idle: list[int]) -> None:
        """Secure aggregation dispatches whole groups: ``K`` idle nodes at once (sync: the round's nodes),
        each group after its key round; a group is one buffer, unmasked once all its members are resolved."""
        assert self.secure is not None
        if self.sync and (self.round_open or self.queue.inflight or len(self.queue)):
            return
        size = min(self.agg.concurrency if self.sync else self.agg.buffer_size, len(self.nodes))
        while size >= sa.MIN_GROUP and len(idle) >= size and self.agg.concurrency - len(self.busy) >= size:
            chosen = [idle[i] for i in sorted(self.rng.permutation(len(idle))[:size])]
            g = self.secure.open(chosen, self._send)
            if g is None:
                log.warning("secure group of nodes %s: fewer than %d took part in the key round", chosen,
                            sa.MIN_GROUP)
                return
            recs = {n: self.secure.train_record(g, i) for i, n in enumerate(g.nodes)}
            for i, slot in enumerate(self._dispatch(g.nodes, recs)):
                self.secure.bind(g, i, slot.index)
            if self.sync:
                self.round_open = True
                return
            idle = [n for n in idle if n not in self.busy]

    def _secure_arrived(self, ev: _Event, t: float) -> None:
        assert self.secure is not None
        g, reason, detail = self.secure.arrived(ev.slot.index, ev.raw, ev.content,
                                                dispatched_version=ev.slot.version, current_version=self.version,
                                                max_staleness=self.agg.max_staleness)
        if reason is not None:
            log.warning("update from node %d refused: %s %s", ev.slot.node_id, reason.value, detail)
            self._get(self.actor.reject.remote(reason.value))
            self.live.refused_update(ev.slot.node_id, reason.value)
        else:
            self.live.accepted_update(ev.slot.node_id, staleness=self.version - ev.raw.base_version,
                                      bytes_up=len(ev.raw.payload), metrics=ev.raw.metrics)
        if g is not None and g.complete:
            self._unmask(g, t)

    def _secure_lost(self, slot: _Slot, t: float) -> None:
        g = self.secure.lost(slot.index) if self.secure is not None else None
        if g is not None and g.complete:
            self._unmask(g, t)

    def _holder_offline(self, g: Group, index: int) -> bool:
        """Simulation: a holder drops out of the unmasking as it drops out of training (profiles.dropout)."""
        node = g.nodes[index]
        prof = self._profile(node) if self.clock.virtual else None
        return prof is not None and clk.dropped(prof, seed=self.cfg.seed + 1, partition_id=self.node_pid[node],
                                                dispatch_index=int(g.gid[:8], 16))

    def _unmask(self, g: Group, t: float) -> None:
        """All members of ``g`` are resolved: unmask its sum with the holders online and apply its mean."""
        assert self.secure is not None
        senders = sorted(g.uploads)
        if len(senders) < sa.MIN_GROUP:
            self.secure.groups.pop(g.gid, None)
            for _ in senders:
                self._get(self.actor.reject.remote(Reason.SECAGG_ALONE.value))
            return
        present = set(self.nodes)
        holders = [i for i, n in enumerate(g.nodes) if n in present and not self._holder_offline(g, i)]
        try:
            total = self.secure.finish(g, self._send(self.secure.unmask_messages(g, holders)))
        except sa.SecAggError as e:
            log.warning("secure group %s discarded (%d updates): %s", g.gid, len(senders), e)
            for _ in senders:
                self._get(self.actor.reject.remote(Reason.SECAGG_DISCARDED.value))
            _event(self.run_dir, event="secagg_discarded", group=g.gid, senders=len(senders), error=str(e)[:300])
            return
        mean = group_mean(total, len(senders), dp_noise=self.agg.secure_dp_noise, clip=self.agg.secure_clip)
        staleness = [max(0, self.version - g.base_versions[i]) for i in senders]
        v = self._get(self.actor.apply_sum.remote(sa.unflatten(mean, self.layout), staleness, t, g.upload_bytes))
        self.acc.updates += len(senders)
        self.acc.upload_bytes += g.upload_bytes
        self.acc.staleness.extend(staleness)
        self.bytes_sent += g.upload_bytes
        _event(self.run_dir, event="secagg_group", group=g.gid, members=g.spec.size, senders=len(senders),
               holders=len(holders), threshold=g.spec.t, version=int(v))
        self._on_version(int(v), t)

    # ------------------------------------------------------------------ replies
    def _pull(self) -> int:
        if not self.inflight:
            return 0
        got = 0
        for reply in self.grid.pull_messages(list(self.inflight)):
            mid = reply.metadata.reply_to_message_id
            slot = self.inflight.pop(mid, None)
            if slot is None:
                continue  # a reply to a message already given up
            got += 1
            ev = _Event(slot=slot)
            upload = 0
            if reply.has_error():
                ev.reason, ev.detail = Reason.REPLY_ERROR.value, str(reply.error.reason)[:200]
            else:
                try:
                    ev.raw = extract(reply.content)
                    upload = len(ev.raw.payload)
                    ev.content = reply.content if self.secure is not None else None
                    pid = ev.raw.metrics.get(wire.PARTITION_ID)
                    if pid is not None and pid >= 0:
                        self.node_pid[slot.node_id] = int(pid)
                except UpdateRejected as e:
                    ev.reason, ev.detail = e.reason.value, e.detail
            self.queue.arrived(mid, self._arrival(slot, upload, ev), ev, order=slot.index)
        return got

    def _arrival(self, slot: _Slot, upload: int, ev: _Event) -> float:
        if not self.clock.virtual:
            return self.clock.now()
        prof = self._profile(slot.node_id)
        if prof is None:
            return slot.dispatch_t  # no profile known: the reply costs no virtual time
        pid = self.node_pid[slot.node_id]
        if clk.dropped(prof, seed=self.cfg.seed, partition_id=pid, dispatch_index=slot.index):
            ev.raw, ev.reason, ev.detail = None, Reason.TIMEOUT.value, "device dropped out (simulated)"
            return slot.dispatch_t + self.agg.reply_timeout_s
        steps = self._min_steps()
        if ev.raw is not None and self.cfg.train.local_epochs > 0:  # the work scales with the device's data
            steps = max(steps, int(ev.raw.metrics.get(wire.TRAIN_STEPS, steps)))
        return clk.arrival_time(slot.dispatch_t, prof, local_steps=steps,
                                download_bytes=slot.download_bytes, upload_bytes=upload)

    def _min_steps(self) -> int:
        """The fewest optimizer steps a device takes per update (the dispatch-time lower bound of its work)."""
        t = self.cfg.train
        return min(t.local_steps, t.max_local_steps) if t.local_epochs > 0 and t.max_local_steps > 0 \
            else t.local_steps

    def _apply_ready(self) -> int:
        applied = 0
        while self.version < self.agg.versions and not self.done:
            ev_t = self.queue.pop()
            if ev_t is None:
                break
            t, ev = ev_t
            applied += 1
            self.busy.discard(ev.slot.node_id)
            if ev.reason is not None:
                log.warning("update from node %d refused: %s %s", ev.slot.node_id, ev.reason, ev.detail)
                self._get(self.actor.reject.remote(ev.reason))
                self.live.refused_update(ev.slot.node_id, ev.reason)
                self._secure_lost(ev.slot, t)
            elif self.secure is not None:
                self._secure_arrived(ev, t)
            else:
                res = self._get(self.actor.submit.remote(ev.raw, t, ev.slot.version))
                if not res["accepted"]:
                    log.warning("update from node %d refused: %s %s", ev.slot.node_id, res["reason"],
                                res["detail"])
                    self.live.refused_update(ev.slot.node_id, res["reason"], staleness=res.get("staleness"),
                                             metrics=ev.raw.metrics)
                else:
                    self.live.accepted_update(ev.slot.node_id, staleness=int(res["staleness"]),
                                              bytes_up=len(ev.raw.payload), metrics=ev.raw.metrics)
                    self.acc.updates += 1
                    self.acc.upload_bytes += len(ev.raw.payload)
                    self.acc.staleness.append(int(res["staleness"]))
                    self.bytes_sent += len(ev.raw.payload)
                if res["new_version"] is not None:
                    self._on_version(int(res["new_version"]), t)
            self._close_round()
            # the freed node gets the newest version at this (virtual) instant, before any later reply is
            # applied: its new message's lower bound then holds back replies that arrive after it
            self._fill()
        return applied

    def _close_round(self) -> None:
        """Sync: once every message of the round is answered (or given up), the round's buffer is a version."""
        if self.sync and self.round_open and not self.queue.inflight and not len(self.queue):
            self.round_open = False
            v = self._get(self.actor.aggregate.remote(self.clock.now()))
            if v is not None:
                self._on_version(int(v), self.clock.now())

    # ------------------------------------------------------------------ versions
    def _on_version(self, v: int, t: float) -> None:
        self._record_version(v, t)
        self._maybe_train(v, t)

    def _record_version(self, v: int, t: float) -> None:
        self.version, self.params = self._get(self.actor.snapshot.remote())
        budget = self.cfg.simulation.time_budget_s
        if self.clock.virtual and 0 < budget <= t:  # simulation.time_budget_s: virtual time is up
            self.done = True
        self.live.new_version(v, t)
        if v % self.agg.eval_every and v < self.agg.versions and not self.done:
            return
        res: dict[str, float] = {}
        if self.eval_data:  # without an eval set a version is recorded with its counters only
            load_trainable_state(self.model, {k: torch.from_numpy(np.array(a)) for k, a in self.params.items()},
                                 self.cfg.train.scope)
            res = evaluate(self.model, self.eval_data)
        st = self._get(self.actor.stats.remote())
        rec: dict[str, Any] = {
            "version": v, **{k: res[k] for k in ("accuracy", "loss") if k in res},
            **{k: x for k, x in res.items() if k.startswith(wire.ACC_PREFIX)},
            "updates": self.acc.updates, "upload_bytes": self.acc.upload_bytes,
            "virtual_time" if self.clock.virtual else "real_time": t,
            "wall_time": time.monotonic() - self.t_wall0, "bytes_sent": self.bytes_sent,
            "bytes_down": self.bytes_down, "staleness": self.acc.staleness,
            "rejected": st["rejections"], "inflight": len(self.inflight), "mode": self.agg.mode,
        }
        self.acc = _VersionAcc()
        self.live.evaluated(rec)
        stale = f"{np.mean(rec['staleness']):.1f}" if rec["staleness"] else "-"
        scores = f"accuracy {res['accuracy']:.3f}  loss {res['loss']:.3f}" if res else "accuracy -  loss -"
        print(f"[fedge] version {v:3d}  {scores}  "
              f"t {t:8.1f}s{'(virtual)' if self.clock.virtual else ''}  updates {rec['updates']}  "
              f"staleness {stale}  rejected {sum(st['rejections'].values())}  "
              f"uploaded {rec['upload_bytes'] / 1024:.1f} KiB", flush=True)
        if self.run_dir:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
        if res and 0 < self.agg.stop_at_accuracy <= res["accuracy"]:
            self.done = True

    # ------------------------------------------------------------------ global training
    def _maybe_train(self, v: int, t: float) -> None:
        """Every ``training.every_versions`` versions: global training on Ray Train, then a new base.

        The newest adapters are merged into the base, the whole model trains on the cloud's data
        (``training.data_path`` or generated), and the aggregator is rebased: the next version holds fresh
        adapters for the new base, updates trained on the old base are refused as ``unknown_version``, and
        the new base is published (:mod:`cloud.publisher`) and every later message names it
        (``wire.BASE_MODEL``): devices fetch it from the shard server. The loop waits for it;
        with a virtual clock it costs no virtual time. A failed training run is reported and the federation
        goes on with the old base.
        """
        tr = self.cfg.training
        if tr.every_versions <= 0:  # on demand only (the default)
            return
        from .training import TrainingError, run_global_training, training_due

        if self.done or v >= self.agg.versions or not training_due(v, tr.every_versions, self.last_trained):
            return
        import ray

        self.last_trained = v
        print(f"[fedge] global training on version {v} ({tr.steps} steps, {tr.workers} Ray Train worker(s))",
              flush=True)
        over: dict[str, Any] = {}
        free = float(ray.available_resources().get("CPU", 0.0))
        if tr.workers * tr.cpus_per_worker > free:  # e.g. a simulation's nodes hold the CPUs: share them
            over["cpus_per_worker"] = 0.0
        try:
            res = run_global_training(self.cfg, base_state(self.model), self.params, base_version=v, **over)
        except TrainingError as e:
            log.error("global training on version %d failed, keeping the base: %s", v, e)
            _event(self.run_dir, event="global_training_failed", version=v, error=str(e)[:500])
            self.live.event("training_failed", version=v, error=str(e)[:500])
            return
        base, bv, fresh = res.rebase_args()
        try:
            base = self._publish(bv, base)  # the weights devices rebuild: the server rebases on exactly those
        except (OSError, ValueError, RuntimeError) as e:  # e.g. a full disk, an export that disagrees
            log.error("publishing the base trained on version %d failed, keeping the old base: %s", v, e)
            _event(self.run_dir, event="publish_failed", version=v, error=str(e)[:500])
            return
        new_v = int(self._get(self.actor.rebase.remote(base, bv, adapters=fresh)))
        path = self._install_base(bv, base)
        self.last_trained = new_v
        loss = (res.first_loss(), res.last_loss()) if res.metrics else (math.nan, math.nan)
        _event(self.run_dir, event="global_training", base_version=bv, version=new_v, steps=res.steps,
               seconds=res.seconds, loss_first=loss[0], loss_last=loss[1], base=path,
               failures=len(res.failures))
        self.live.event("training", base_version=bv, version=new_v, steps=res.steps, seconds=res.seconds,
                        loss_first=loss[0], loss_last=loss[1])
        print(f"[fedge] global training: {res.steps} steps in {res.seconds:.1f} s, loss {loss[0]:.3f} -> "
              f"{loss[1]:.3f}; base {bv} -> version {new_v}", flush=True)
        self._record_version(new_v, t)

    def _publish(self, base_version: int, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Publish ``base`` as the store version of ``base_version`` (once) and name it in later messages.

        Returns the weights devices rebuild from the store: ``base``, except that a shard published as a delta
        against the previous base holds previous + decoded delta (within half a quantization step of the
        change); a version already in the store (a resumed run) is read back as published.
        """
        assert self.publisher is not None
        from .export import load_state_from_shards
        from .publisher import base_version_name, plain_from_state

        name = base_version_name(base_version)
        have = self.publisher.published(name)
        if have is not None:
            state = load_state_from_shards(self.publisher.store.version_dir(name), have)
            self.base_model = name
            return {k: v.numpy() for k, v in state.items()}
        t0 = time.monotonic()
        manifest, published = self.publisher.publish(plain_from_state(base, model_kwargs(self.cfg)), version=name)
        seconds = time.monotonic() - t0
        deltas = manifest.shards("delta")
        _event(self.run_dir, event="published", base_version=base_version, model=name, serial=manifest.serial,
               store=str(self.publisher.store.root), seconds=seconds,
               training_bytes=manifest.total_bytes("safetensors"), delta_bytes=manifest.total_bytes("delta"),
               deltas=len(deltas))
        print(f"[fedge] published base {name} (serial {manifest.serial}) in {seconds:.1f} s: "
              f"{manifest.total_bytes('safetensors')} training bytes, {len(deltas)} deltas of "
              f"{manifest.total_bytes('delta')} bytes", flush=True)
        self.base_model = name
        return published

    def _install_base(self, base_version: int, base: dict[str, np.ndarray]) -> str:
        """Load ``base`` into the evaluation model; return the published version devices fetch it as.

        A copy goes to ``<run_dir>/bases/<version>.safetensors`` too: ``fedge evaluate RUN_DIR`` scores the final
        adapters on the newest base there."""
        load_base_state(self.model, {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in base.items()})
        if self.run_dir and self.base_model:
            path = self.run_dir / BASES_SUBDIR / f"{self.base_model}.safetensors"
            if not path.is_file():
                save_base(self.model, path)
        self.live.event("published", base_version=base_version, model=self.base_model)
        return self.base_model

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        """Run until ``aggregation.versions`` versions exist."""
        while self.version < self.agg.versions and not self.done:
            self._refresh_nodes()
            self._check_timeouts()
            self._close_round()
            self._fill()
            got = self._pull()
            applied = self._apply_ready()
            if not got and not applied:
                time.sleep(self.poll_s)


def _state_kwargs(cfg: FedgeConfig, ckpt_dir: str | None) -> dict[str, Any]:
    a = cfg.aggregation
    k = a.concurrency if a.mode == "sync" else a.buffer_size  # sync: the round barrier flushes the buffer
    return {"buffer_size": k, "staleness": a.staleness if a.mode == "async" else "constant",
            "staleness_a": a.staleness_a, "staleness_b": a.staleness_b, "max_staleness": a.max_staleness,
            "server_opt": a.server_opt,
            "server_lr": a.server_lr or default_server_lr(a.server_opt, a.beta1), "beta1": a.beta1, "beta2": a.beta2, "tau": a.tau,
            "max_norm": a.max_norm,
            "norm_action": a.norm_action, "robust": a.robust, "trim_ratio": a.trim_ratio,
            "norm_factor": a.norm_factor, "norm_warmup": a.norm_warmup, "examples_factor": a.examples_factor,
            "max_examples": a.max_examples, "window": a.window, "outlier_threshold": a.outlier_threshold,
            "min_cosine": a.min_cosine,
            "replay_window": a.replay_window,
            "checkpoint_dir": ckpt_dir, "checkpoint_every": cfg.fault_tolerance.checkpoint_every}


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


def publisher_for(cfg: FedgeConfig, run_dir: Path | None = None) -> Any:
    """The run's base publisher: ``publish.store`` (default: ``models`` in the run folder) signed with
    ``publish.signing_key`` (default: a key generated in the store's ``.signing`` folder, for one host)."""
    from .publisher import BasePublisher

    root = published_store(store=cfg.publish.store, run_dir=str(run_dir or cfg.run_dir),
                           storage_path=cfg.training.storage_path)
    key = Path(cfg.publish.signing_key) if cfg.publish.signing_key else root / ".signing" / "manifest.key"
    if not cfg.publish.signing_key and not key.is_file():
        try:
            generate_keypair(key.parent)
        except FileExistsError:  # another process made it first
            pass
    return BasePublisher(root, key, image_size=cfg.model.image_size, audio_frames=cfg.model.audio_frames,
                         onnx=cfg.publish.onnx, deltas=cfg.publish.deltas)


def _event(run_dir: Path | None, **rec: Any) -> None:
    if run_dir:
        with open(run_dir / "events.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")


def _wait_nodes(grid: Grid, n: int, timeout_s: float,
                on_nodes: Callable[[list[int]], None] | None = None) -> list[int]:
    t0 = time.monotonic()
    while True:
        nodes = sorted(grid.get_node_ids())
        if on_nodes is not None:
            on_nodes(nodes)
        if len(nodes) >= n or time.monotonic() - t0 > timeout_s:
            return nodes
        time.sleep(0.5)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Aggregate asynchronously (or synchronously) until ``aggregation.versions`` versions exist."""
    t_start = time.monotonic()
    cfg = config_from_context(context.run_config)
    torch.manual_seed(cfg.seed)
    if not cfg.run_dir:  # every run keeps its record; `flwr run .` without run_dir gets one of its own
        cfg = dataclasses.replace(cfg, run_dir=str(default_run_dir(context.run_id)))
        print(f"[fedge] run directory: {cfg.run_dir}", flush=True)
    run_dir = Path(cfg.run_dir)
    cfg.save(run_dir)
    sim = is_simulation(grid)
    if not sim and not bound_reply_pulls(cfg.aggregation.reply_timeout_s):
        log.warning("cannot bound Flower's wait for a reply's objects: a device killed mid-upload may stall "
                    "the loop")
    virtual = cfg.aggregation.clock == "virtual" or (cfg.aggregation.clock == "auto" and sim)
    # the dashboard comes up first: an operator sees devices connect while the server waits for them
    watched = watch(cfg.dashboard, run_dir=run_dir, mode=cfg.aggregation.mode,
                    buffer_size=_state_kwargs(cfg, None)["buffer_size"], concurrency=cfg.aggregation.concurrency,
                    target_versions=cfg.aggregation.versions, clock="virtual" if virtual else "real")
    nodes = _wait_nodes(grid, cfg.aggregation.min_nodes, 120.0, on_nodes=watched.live.nodes)
    if not nodes:
        watched.close()
        raise RuntimeError("no SuperNodes connected")
    how = ensure_ray(wait_for_simulation_s=120.0 if sim else 0.0, run_dir=run_dir)
    model = global_model(cfg)
    ckpt_dir = str(run_dir / CHECKPOINT_SUBDIR) if run_dir else None
    kwargs = _state_kwargs(cfg, ckpt_dir)
    restored: AggregatorState | None = None
    if ckpt_dir and cfg.aggregation.resume and (Path(ckpt_dir) / "aggregator.npz").is_file():
        restored = AggregatorState.restore(**kwargs)  # the config's aggregation options win over the saved
    if restored is not None:
        actor = start_actor(restored)
    else:
        initial = {k: v.numpy() for k, v in trainable_state(model, cfg.train.scope).items()}
        actor = start_actor(None, initial=initial, **kwargs)
    import ray

    version, _ = ray.get(actor.snapshot.remote())
    history = ray.get(actor.get_history.remote())
    t0 = float(history[-1]["time"]) if history and math.isfinite(history[-1]["time"]) else 0.0
    clock: clk.RealClock | clk.VirtualClock = clk.VirtualClock(t0) if virtual else clk.RealClock(t0)
    if restored is not None:
        recovery_s = time.monotonic() - t_start
        print(f"[fedge] resumed from checkpoint: version {version} (ray: {how}) in {recovery_s:.2f} s",
              flush=True)
        _event(run_dir, event="resumed", version=version, recovery_s=recovery_s, ray=how)
    else:
        _event(run_dir, event="started", version=version, ray=how, mode=cfg.aggregation.mode,
               clock="virtual" if virtual else "real")
    num_partitions = max(len(nodes), 1)  # simulation: Flower's num-partitions = the number of nodes
    watched.live.started(version)
    if ray_dashboard_url():
        print(f"[fedge] Ray dashboard: {ray_dashboard_url()}", flush=True)
        watched.live.link("ray", ray_dashboard_url())
    eval_data = heldout_data(cfg)
    if eval_data is None:
        print(f"[fedge] {NO_EVAL}", flush=True)
        _event(run_dir, event="no_eval_set")
    loop = ServerLoop(grid, cfg, actor=actor, clock=clock, run_dir=run_dir, eval_data=eval_data,
                      model=model, num_partitions=num_partitions, live=watched.live)
    loop.t_wall0 = t_start
    prev = None
    if threading.current_thread() is threading.main_thread():
        prev = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        loop.run()
    finally:
        if prev is not None:
            signal.signal(signal.SIGTERM, prev)
        watched.close()
        path = ray.get(actor.checkpoint.remote())
        st = ray.get(actor.stats.remote())
        version, params = ray.get(actor.snapshot.remote())
        _event(run_dir, event="stopped", checkpoint=path, **st)
        log.info("aggregator stopped at version %d (%s)", version, st)
        if run_dir:
            np.savez(run_dir / "global_adapters.npz", **params)
            (run_dir / "summary.json").write_text(json.dumps({**st, "dispatches": loop.dispatches}, indent=2))
        context.state["fedge-final"] = wire.adapters_to_record(params)
        ray.kill(actor)


def ray_dashboard_url() -> str:
    """The URL of Ray's dashboard when the Ray this process joined runs one ("" otherwise)."""
    import ray

    try:
        url = ray._private.worker.get_dashboard_url()  # no public getter once Ray is started elsewhere
    except Exception:  # noqa: BLE001  (not connected, or a Ray without it: no link, no failure)
        return ""
    return f"http://{url}" if url and not url.startswith("http") else (url or "")


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
