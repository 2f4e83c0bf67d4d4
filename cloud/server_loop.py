"""The cloud ServerApp on Flower's Grid: asynchronous buffered aggregation (FedBuff), synchronous FedAvg alike.

The loop keeps up to ``C`` nodes training (``grid.push_messages``); each TRAIN carries the global adapters,
their version and the round config (:mod:`fedge.common.wire`). Replies are pulled as they arrive
(``grid.pull_messages``, matched by ``reply_to_message_id``), ordered by the clock (:mod:`fedge.cloud.clock`:
virtual under simulation, real in deployment) and submitted to the aggregator state, a Ray actor
(:mod:`fedge.cloud.state`) that validates each update and makes a new version after ``K`` accepted ones. An idle
node gets the newest version at once; node ids are re-read every pass, so nodes that join are used and
nodes that leave free their slot; a node that does not answer within ``aggregation.reply_timeout_s`` is
given up and its slot reused. The global adapters are evaluated on held-back data every
``aggregation.eval_every`` versions: one ``[fedge] version N accuracy ...`` line and one ``metrics.jsonl``
record each. Sync mode (FedAvg) is the same loop with a barrier: ``C`` = ``K`` = nodes per round.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedge.common import secagg as sa
from fedge.common import wire
from fedge.common.config import FedgeConfig
from fedge.common.model import MultimodalMoE
from fedge.common.run_log import Event, VersionRecord
from fedge.common.scope import load_trainable_state
from fedge.common.training import evaluate

from . import clock as clk
from .builders import device_profile, min_local_steps, secure_groups, state_kwargs
from .dashboard import LiveState
from .global_training import PublishedBase
from .run_log import VersionAcc, event, metrics_record, version_line
from .secure_buffer import Group, SecureGroups, group_mean
from .validation import Reason, UpdateRejected, extract

__all__ = ["ServerLoop"]

log = logging.getLogger("fedge.server")

UNMASK_REQUESTS = 3  # a secure group's unmasking asks the holders that have not answered up to this often


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


class ServerLoop:
    """The aggregation loop; one instance per ServerApp run."""

    def __init__(self, grid: Grid, cfg: FedgeConfig, *, actor: Any, clock: clk.RealClock | clk.VirtualClock,
                 run_dir: Path | None, eval_data: dict[str, np.ndarray] | None, model: MultimodalMoE,
                 num_partitions: int, live: LiveState | None = None) -> None:
        self.grid, self.cfg, self.actor, self.clock = grid, cfg, actor, clock
        # what the dashboard, /metrics, `fedge status` and live TensorBoard read (cloud/dashboard)
        self.live = live or LiveState(mode=cfg.aggregation.mode, buffer_size=state_kwargs(cfg, None)["buffer_size"],
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
        self.acc = VersionAcc()
        self.version, self.params = self._get(self.actor.snapshot.remote())
        self.round_open = False  # sync: a round's messages are out
        self.done = False  # aggregation.stop_at_accuracy reached
        self.nodes: list[int] = []
        self._nodes_read = -math.inf
        self.bases = PublishedBase(cfg, actor=actor, model=model, run_dir=run_dir, live=self.live,
                                   version=self.version)
        self.poll_s = 0.02 if clock.virtual else 0.25
        # aggregation.secure: groups unmasked only as sums
        self.secure: SecureGroups | None = secure_groups(cfg, self.params)
        self.layout = sa.flatten(self.params)[1]
        self.t_wall0 = time.monotonic()

    @property
    def base_model(self) -> str:
        """The published base the current version's adapters belong to ("": the config's base)."""
        return self.bases.base_model

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
        return device_profile(self.cfg, pid, self.num_partitions)

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
                                    seed=self.cfg.seed * 7919 + self.dispatches, base_model=self.bases.base_model)
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
                min_local_steps(self.cfg.train) * prof.step_s
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
        want = self.agg.concurrency if self.sync else self.secure.group_size(self.agg.buffer_size)
        size = min(want, self.agg.concurrency, len(self.nodes))
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

    def _holder_offline(self, g: Group, index: int, attempt: int) -> bool:
        """Simulation: a holder drops out of each request of the unmasking as it drops out of training
        (profiles.dropout), independently per request."""
        node = g.nodes[index]
        prof = self._profile(node) if self.clock.virtual else None
        return prof is not None and clk.dropped(prof, seed=self.cfg.seed + 1 + 7919 * attempt,
                                                partition_id=self.node_pid[node], dispatch_index=int(g.gid[:8], 16))

    def _unmask(self, g: Group, t: float) -> None:
        """All members of ``g`` are resolved: unmask its sum with the holders online and apply its mean."""
        assert self.secure is not None
        self.secure.resolved(g)
        senders = sorted(g.uploads)
        if len(senders) < sa.MIN_GROUP:
            self.secure.groups.pop(g.gid, None)
            for _ in senders:
                self._get(self.actor.reject.remote(Reason.SECAGG_ALONE.value))
            return
        present, replies, holders = set(self.nodes), [], []
        for attempt in range(UNMASK_REQUESTS):  # a holder away now may be back for the next request
            ask = [i for i, n in enumerate(g.nodes) if n in present and i not in holders
                   and not self._holder_offline(g, i, attempt)]
            sent = self._send(self.secure.unmask_messages(g, ask))
            replies += sent
            got = [r for r in sent if not r.has_error()]
            holders += [g.nodes.index(int(r.metadata.src_node_id)) for r in got
                        if int(r.metadata.src_node_id) in g.nodes]
            if len(holders) >= g.spec.t:
                break
        try:
            total = self.secure.finish(g, replies)
        except sa.SecAggError as e:
            log.warning("secure group %s discarded (%d updates): %s", g.gid, len(senders), e)
            for _ in senders:
                self._get(self.actor.reject.remote(Reason.SECAGG_DISCARDED.value))
            event(self.run_dir, event=Event.SECAGG_DISCARDED, group=g.gid, senders=len(senders), error=str(e)[:300])
            return
        mean = group_mean(total, len(senders), dp_noise=self.agg.secure_dp_noise, clip=g.spec.clip)
        staleness = [max(0, self.version - g.base_versions[i]) for i in senders]
        v = self._get(self.actor.apply_sum.remote(sa.unflatten(mean, self.layout), staleness, t, g.upload_bytes))
        self.acc.updates += len(senders)
        self.acc.upload_bytes += g.upload_bytes
        self.acc.staleness.extend(staleness)
        self.bytes_sent += g.upload_bytes
        event(self.run_dir, event=Event.SECAGG_GROUP, group=g.gid, members=g.spec.size, senders=len(senders),
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
        steps = min_local_steps(self.cfg.train)
        if ev.raw is not None and self.cfg.train.local_epochs > 0:  # the work scales with the device's data
            steps = max(steps, int(ev.raw.metrics.get(wire.TRAIN_STEPS, steps)))
        return clk.arrival_time(slot.dispatch_t, prof, local_steps=steps,
                                download_bytes=slot.download_bytes, upload_bytes=upload)

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
        if self.done or v >= self.agg.versions:
            return
        new_v = self.bases.maybe_train(v, self.params)
        if new_v is not None:
            self._record_version(new_v, t)

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
        rec = VersionRecord(
            version=v, accuracy=res.get("accuracy"), loss=res.get("loss"),
            modality_accuracy={k[len(wire.ACC_PREFIX):]: x for k, x in res.items() if k.startswith(wire.ACC_PREFIX)},
            updates=self.acc.updates, upload_bytes=self.acc.upload_bytes,
            virtual_time=t if self.clock.virtual else None, real_time=None if self.clock.virtual else t,
            wall_time=time.monotonic() - self.t_wall0, bytes_sent=self.bytes_sent, bytes_down=self.bytes_down,
            staleness=self.acc.staleness, rejected=dict(st["rejections"]), inflight=len(self.inflight),
            mode=self.agg.mode)
        self.acc = VersionAcc()
        self.live.evaluated(rec)
        print(version_line(rec, t=t, virtual=self.clock.virtual), flush=True)
        metrics_record(self.run_dir, rec)
        if rec.accuracy is not None and 0 < self.agg.stop_at_accuracy <= rec.accuracy:
            self.done = True

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
