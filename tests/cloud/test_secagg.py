"""Secure aggregation: the server's view of a group reveals only its sum; dropout, staleness, lying members.

Pure protocol tests (:mod:`fedge.common.secagg`) and the Flower-record path (cloud/secure_buffer.py talking to
edge/secagg_mod.py through in-process messages), plus one short real simulation with ``aggregation.secure``.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity
from scipy import stats

from fedge.cloud.secure_buffer import Group, SecureGroups, group_mean
from fedge.cloud.validation import Reason, extract
from fedge.common import secagg as sa
from fedge.common import wire
from fedge.common.config import load_config
from fedge.edge.mods import RAW_DELTA
from fedge.edge.secagg_mod import handle_query, secagg_mod

ROOT = Path(__file__).resolve().parents[2]
N, K_KEPT = 3000, 600


def _group(size: int, *, t_frac: float = 0.6, n: int = N, k: int = K_KEPT, clip: float = 1.0):
    """A group formed by the pure protocol: members' long-term keys, key round answers, the spec."""
    cs = [sa.new_keypair() for _ in range(size)]
    c_pks = tuple(pk for _, pk in cs)
    t = sa.threshold(size, t_frac)
    keys = [sa.member_keys("g", i, cs[i][0], c_pks, t) for i in range(size)]
    spec = sa.GroupSpec("g", c_pks, tuple(a.s_pk for _, a in keys), t, n, k, clip)
    return spec, cs, keys


def _updates(size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(N) * 0.3 / np.sqrt(N)).astype(np.float32) for _ in range(size)]


def _mask_all(spec, cs, keys, xs, *, skip=(), seed=2):
    """Every member but ``skip`` masks its update: (uploads, what each sent in float)."""
    rng = np.random.default_rng(seed)
    ups, sent = {}, {}
    for i in range(spec.size):
        if i not in skip:
            ups[i], sent[i] = sa.member_mask(xs[i], spec, i, cs[i][0], keys[i][0], rng)
    return ups, sent


def _answers(spec, cs, keys, ups, holders):
    senders = sorted(ups)
    dropped = [j for j in range(spec.size) if j not in ups]
    return {h: sa.member_reveal(spec, h, cs[h][0], {i: ups[i].sealed_b[h] for i in senders},
                                {j: keys[j][1].sealed_s[h] for j in dropped}, senders, dropped) for h in holders}


def test_unmasked_sum_equals_the_plain_sum_of_what_members_sent():
    spec, cs, keys = _group(5)
    xs = _updates(5)
    ups, sent = _mask_all(spec, cs, keys, xs, seed=1)
    total = sa.server_unmask(spec, [a.commit_s for _, a in keys], ups, _answers(spec, cs, keys, ups, range(5)))
    np.testing.assert_allclose(total, sum(sent.values()), atol=1e-6)
    # quantisation is unbiased and fine: on the kept coordinates the sum is the float sum within one level each
    idx = spec.indices()
    step = spec.quantizer.r / spec.quantizer.q_max
    assert np.max(np.abs(total[idx] - sum(xs)[idx])) <= 5 * step + 1e-7


def test_individual_masked_vectors_are_indistinguishable_from_uniform():
    spec, cs, keys = _group(4, n=40_000, k=40_000)
    zeros = np.zeros(40_000, np.float32)  # the least uniform input there is
    up, _ = sa.member_mask(zeros, spec, 0, cs[0][0], keys[0][0], np.random.default_rng(0))
    bits = spec.quantizer.bits
    v = sa.decode_masked(up.payload, 40_000, bits).astype(np.int64)
    counts = np.bincount(v, minlength=1 << bits)  # every ring value equally often
    assert counts.size == 1 << bits and stats.chisquare(counts).pvalue > 1e-4


def test_thirty_percent_of_members_dropping_after_sending_is_recovered():
    spec, cs, keys = _group(10)
    ups, sent = _mask_all(spec, cs, keys, _updates(10, seed=3))
    holders = [h for h in range(10) if h not in (1, 4, 8)]  # three senders gone before the unmasking
    assert len(holders) >= spec.t and 1 - spec.t / spec.size >= 0.3
    total = sa.server_unmask(spec, [a.commit_s for _, a in keys], ups, _answers(spec, cs, keys, ups, holders))
    np.testing.assert_allclose(total, sum(sent.values()), atol=1e-6)


def test_members_dropping_before_sending_have_their_pairwise_masks_removed():
    spec, cs, keys = _group(10)
    ups, sent = _mask_all(spec, cs, keys, _updates(10, seed=4), skip=(0, 7))  # 0 and 7 never sent
    holders = [h for h in range(10) if h not in (0, 7, 3, 5)]  # and two senders gone after sending
    total = sa.server_unmask(spec, [a.commit_s for _, a in keys], ups, _answers(spec, cs, keys, ups, holders))
    np.testing.assert_allclose(total, sum(sent.values()), atol=1e-6)


def test_too_few_holders_cannot_unmask():
    spec, cs, keys = _group(5)
    ups = {i: sa.member_mask(x, spec, i, cs[i][0], keys[i][0], np.random.default_rng(i))[0]
           for i, x in enumerate(_updates(5))}
    with pytest.raises(sa.SecAggError, match="holders answered"):
        sa.server_unmask(spec, [a.commit_s for _, a in keys], ups,
                         _answers(spec, cs, keys, ups, range(spec.t - 1)))


def test_a_member_whose_shares_miss_its_commitment_gets_its_group_discarded():
    spec, cs, keys = _group(5)
    xs = _updates(5)
    ups = {i: sa.member_mask(xs[i], spec, i, cs[i][0], keys[i][0], np.random.default_rng(i))[0] for i in range(5)}
    liar = ups[2]
    ups[2] = sa.MaskedUpdate(liar.payload, liar.sealed_b, sa.commitment(os.urandom(16)))  # commits to another seed
    with pytest.raises(sa.SecAggError, match="member 2"):
        sa.server_unmask(spec, [a.commit_s for _, a in keys], ups, _answers(spec, cs, keys, ups, range(5)))


def test_a_member_masking_with_something_else_than_it_shared_is_caught_by_the_range_check():
    spec, cs, keys = _group(5)
    xs = _updates(5)
    ups = {i: sa.member_mask(xs[i], spec, i, cs[i][0], keys[i][0], np.random.default_rng(i))[0] for i in range(5)}
    bits = spec.quantizer.bits
    v = sa.decode_masked(ups[3].payload, spec.k, bits)
    ups[3] = sa.MaskedUpdate(sa.encode_masked(sa.ring_add(v, sa.prg(os.urandom(16), spec.k, bits), bits), bits),
                             ups[3].sealed_b,
                             ups[3].commit_b)
    with pytest.raises(sa.SecAggError, match="out of range"):
        sa.server_unmask(spec, [a.commit_s for _, a in keys], ups, _answers(spec, cs, keys, ups, range(5)))


def test_an_inconsistent_share_is_detected_when_more_than_t_holders_answer():
    spec, cs, keys = _group(5)
    ups = {i: sa.member_mask(x, spec, i, cs[i][0], keys[i][0], np.random.default_rng(i))[0]
           for i, x in enumerate(_updates(5))}
    answers = _answers(spec, cs, keys, ups, range(5))
    answers[4][0][1] = (answers[4][0][1] + 1) % sa.PRIME  # holder 4 lies about member 1's share
    with pytest.raises(sa.SecAggError, match="inconsistent"):
        sa.server_unmask(spec, [a.commit_s for _, a in keys], ups, answers)


def test_a_holder_never_reveals_both_secrets_of_one_member():
    spec, cs, keys = _group(4)
    ups = {i: sa.member_mask(x, spec, i, cs[i][0], keys[i][0], np.random.default_rng(i))[0]
           for i, x in enumerate(_updates(4))}
    with pytest.raises(sa.SecAggError, match="both sender and dropped"):
        sa.member_reveal(spec, 0, cs[0][0], {i: ups[i].sealed_b[0] for i in range(4)},
                         {1: keys[1][1].sealed_s[0]}, [0, 1, 2, 3], [1])
    with pytest.raises(sa.SecAggError, match="alone"):
        sa.member_reveal(spec, 0, cs[0][0], {1: ups[1].sealed_b[0]}, {}, [1], [])


def test_quantiser_range_never_wraps_for_a_full_group():
    for levels in (1, 2, 7, 127):
        q = sa.Quantizer(clip=1.0, k=100, group=16, levels=levels)
        for worst in (np.full(100, 10.0), np.full(100, -10.0)):  # beyond the range on purpose: clipped to r
            total = sum(q.quantize(worst, np.random.default_rng(i)) for i in range(16))
            assert np.all(np.abs(total) == 16 * q.q_max) and 2 * 16 * q.q_max + 1 < 1 << q.bits
            assert np.array_equal(sa.from_ring(sa.to_ring(total, q.bits), q.bits), total)
    assert sa.Quantizer(clip=1.0, k=100, group=5).bits == 4  # ternary values of 5 members: sums in [-5, 5]
    for levels in (1, 2, 7):  # largest_group is the inverse of bits: one more member needs a wider ring
        for bits in (4, 6, 10):
            most = sa.Quantizer.largest_group(bits, levels)
            assert sa.Quantizer(clip=1.0, k=1, group=most, levels=levels).bits <= bits
            assert sa.Quantizer(clip=1.0, k=1, group=most + 1, levels=levels).bits > bits


# ---------------------------------------------------------------------------------------------- Flower records
class _Devices:
    """Devices in this process: each node's Context, reached through edge/secagg_mod.py's handlers."""

    def __init__(self, nodes, *, lost=()):
        self.ctx = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
                    for n in nodes}
        self.lost = set(lost)  # nodes that do not answer queries
        self.ids = itertools.count()

    def _routed(self, msg: Message, kind: str) -> Message:
        md = Metadata(run_id=1, message_id=f"m{next(self.ids)}", src_node_id=1, dst_node_id=msg.metadata.dst_node_id,
                      reply_to_message_id="", group_id="", created_at=time.time(), ttl=3600, message_type=kind)
        return Message(content=msg.content, metadata=md)

    def send(self, msgs):
        out = []
        for m in msgs:
            n = m.metadata.dst_node_id
            if n in self.lost:
                continue
            try:
                out.append(handle_query(self._routed(m, MessageType.QUERY), self.ctx[n]))
            except sa.SecAggError:
                continue  # the ClientApp would answer with an error reply
        return out

    def train(self, node: int, rec: ConfigRecord, delta: np.ndarray, base_version: int) -> Message:
        content = RecordDict({wire.SECAGG: rec})
        msg = self._routed(Message(content, dst_node_id=node, message_type=MessageType.TRAIN), MessageType.TRAIN)

        def handler(m, c):
            return Message(RecordDict({
                RAW_DELTA: ArrayRecord({"w": Array(np.ascontiguousarray(delta, np.float32))}),
                wire.UPDATE: ConfigRecord({wire.BASE_VERSION: base_version}),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10.0}),
            }), reply_to=m)

        return secagg_mod(msg, self.ctx[node], handler)


@pytest.fixture
def task_identity():
    prev = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as in a ServerApp process
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = prev


def _run_group(devs, groups, nodes, xs, *, base_versions, current_version=5, max_staleness=3):
    g = groups.open(nodes, devs.send)
    assert g is not None
    reasons = []
    for i, n in enumerate(g.nodes):
        groups.bind(g, i, 100 + i)
    for i, n in enumerate(g.nodes):
        reply = devs.train(n, groups.train_record(g, i), xs[i], base_versions[i])
        _, reason, _ = groups.arrived(100 + i, extract(reply.content), reply.content,
                                      dispatched_version=base_versions[i], current_version=current_version,
                                      max_staleness=max_staleness)
        reasons.append(reason)
    assert g.complete
    holders = [i for i, n in enumerate(g.nodes) if n not in devs.lost]
    return g, reasons, groups.finish(g, devs.send(groups.unmask_messages(g, holders)))


def test_flower_records_round_trip_with_stale_arrivals_and_a_dropped_holder(task_identity):
    nodes = [11, 12, 13, 14, 15]
    devs = _Devices(nodes)
    groups = SecureGroups(n=N, k=K_KEPT, clip=1.0, threshold=0.6)
    xs = _updates(5, seed=9)
    g = groups.open(nodes, devs.send)
    for i in range(5):
        groups.bind(g, i, 100 + i)
    sent = {}
    reasons = {}
    for i, n in enumerate(g.nodes):
        bv = [5, 4, 2, 5, 1][i]  # member 4 trained on version 1: 4 versions stale > max_staleness 3
        reply = devs.train(n, groups.train_record(g, i), xs[i], bv)
        _, reasons[i], _ = groups.arrived(100 + i, extract(reply.content), reply.content, dispatched_version=bv,
                                          current_version=5, max_staleness=3)
        if reasons[i] is None:
            sent[i] = xs[i]
    assert reasons[4] == Reason.STALE and all(reasons[i] is None for i in range(4))
    devs.lost = {12}  # member 1 sent, then dropped out before the unmasking
    total = groups.finish(g, devs.send(groups.unmask_messages(g, [0, 2, 3, 4])))
    idx = g.spec.indices()
    step = g.spec.quantizer.r / g.spec.quantizer.q_max
    assert np.max(np.abs(total[idx] - sum(sent.values())[idx])) <= 4 * step + 1e-7
    assert np.all(total[np.setdiff1d(np.arange(N), idx)] == 0)
    assert not groups.groups  # forgotten once unmasked


def test_a_holder_answers_one_unmasking_per_group(task_identity):
    nodes = [21, 22, 23]
    devs = _Devices(nodes)
    groups = SecureGroups(n=N, k=K_KEPT, clip=1.0, threshold=0.6)
    g, reasons, _ = _run_group(devs, groups, nodes, _updates(3), base_versions=[5, 5, 5])
    assert reasons == [None, None, None]
    # the same group asked again for another set of senders (a difference would be one update): refused
    g.uploads.pop(2)
    assert devs.send(groups.unmask_messages(g, [0, 1])) == []


def test_a_malformed_masked_reply_is_refused_and_counted(task_identity):
    nodes = [31, 32]
    devs = _Devices(nodes)
    groups = SecureGroups(n=N, k=K_KEPT, clip=1.0, threshold=0.6)
    g = groups.open(nodes, devs.send)
    groups.bind(g, 0, 7)
    reply = devs.train(31, groups.train_record(g, 0), _updates(1)[0], 5)
    reply.content.config_records[wire.UPDATE][wire.DELTA] = b"FDGS" + b"\0" * 40
    _, reason, detail = groups.arrived(7, extract(reply.content), reply.content, dispatched_version=5,
                                       current_version=5, max_staleness=3)
    assert reason == Reason.SECAGG_INVALID and detail


def test_central_noise_is_added_once_to_the_sum():
    total = np.zeros(200_000)
    mean = group_mean(total, 4, dp_noise=2.0, clip=0.5, rng=np.random.default_rng(0))
    assert abs(float(np.std(mean)) - 2.0 * 0.5 / 4) < 0.01


def test_secure_aggregation_config_keys_are_checked():
    cfg = load_config(overrides={"aggregation.secure": True})
    assert cfg.aggregation.secure and cfg.aggregation.secure_threshold == 0.6
    with pytest.raises(Exception, match="secure_threshold"):
        load_config(overrides={"aggregation.secure_threshold": 0.0})
    for key, bad in (("secure_keep", 0.0), ("secure_keep", 1.5), ("secure_levels", 0)):
        with pytest.raises(Exception, match=key):
            load_config(overrides={f"aggregation.{key}": bad})


def test_groups_send_the_configured_share_of_coordinates_in_the_smallest_ring():
    from fedge.cloud.builders import secure_groups

    params = {"a": np.zeros((100, 30), np.float32), "b": np.zeros(1000, np.float32)}
    cfg = load_config(overrides={"aggregation.secure": True, "aggregation.secure_keep": 0.25})
    groups = secure_groups(cfg, params)
    assert groups is not None and (groups.n, groups.k, groups.levels) == (4000, 1000, 1)
    spec, cs, keys = _group(5, n=4000, k=1000)
    up, sent = sa.member_mask(np.full(4000, 0.01, np.float32), spec, 0, cs[0][0], keys[0][0],
                              np.random.default_rng(0))
    # 1000 ternary values of a group of 5 (sums in [-5, 5]) travel in a 4-bit ring: 500 bytes and a header
    assert spec.quantizer.bits == 4 and len(up.payload) == 500 + 13
    assert all(len(x) == sa.SEALED_LEN == 33 for x in up.sealed_b)  # 17-byte field element + tag, no nonce
    assert np.count_nonzero(sent) <= 1000 and set(np.flatnonzero(sent)) <= set(spec.indices())


def test_a_dropped_member_whose_key_seed_does_not_make_its_announced_key_is_caught():
    spec, cs, keys = _group(5)
    xs = _updates(5)
    other = sa.member_keys("g", 4, cs[4][0], spec.c_pks, spec.t)[1]  # member 4 announces another key
    spec = sa.GroupSpec(spec.group_id, spec.c_pks, spec.s_pks[:4] + (other.s_pk,), spec.t, spec.n, spec.k,
                        spec.clip)
    ups, _ = _mask_all(spec, cs, keys, xs, skip=(4,))  # ... and drops out: its shared seed must make that key
    with pytest.raises(sa.SecAggError, match="does not make the public key"):
        sa.server_unmask(spec, [a.commit_s for _, a in keys], ups, _answers(spec, cs, keys, ups, range(4)))


@pytest.mark.integration
def test_secure_simulation_completes_and_learns(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    sets = ['aggregation.mode="async"', "aggregation.versions=5", "aggregation.concurrency=4",
            "aggregation.buffer_size=4", "aggregation.secure=true", "profiles.dropout=0.3",
            "train.local_steps=6", "data.samples_per_device=100", "data.eval_samples=200"]
    r = subprocess.run([sys.executable, "-m", "tests.cloud.sim_main", str(run_dir), "4", "fedge.edge.client_app:app",
                        *sets], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["version"] for x in recs] == [1, 2, 3, 4, 5]
    assert recs[-1]["loss"] < recs[0]["loss"]
    events = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    groups = [e for e in events if e["event"] == "secagg_group"]
    assert len(groups) == 5 and all(e["senders"] >= 2 for e in groups)


def test_groups_grow_with_dropout_to_fill_a_buffer_but_keep_their_ring():
    groups = SecureGroups(n=N, k=K_KEPT, clip=1.0, threshold=0.6)
    assert groups.group_size(5) == 5  # nobody dropped yet
    spec = _group(4)[0]
    for _ in range(20):  # groups of 4 where 2 send: half the members drop out
        groups.resolved(Group(spec=spec, nodes=[1, 2, 3, 4], sealed_s=[], commits_s=[],
                              uploads={0: None, 1: None}))  # type: ignore[dict-item]
    assert abs(groups.send_rate - 0.5) < 0.01
    # 5 / 0.5 = 10 members wanted, but ternary sums of more than 7 members need a 5-bit ring instead of 4
    assert groups.group_size(5) == 7
    assert sa.Quantizer(clip=1.0, k=1, group=7).bits == sa.Quantizer(clip=1.0, k=1, group=5).bits == 4


def test_a_group_learns_its_members_mean_norm_and_nothing_of_one():
    spec, cs, keys = _group(5)
    spec = sa.GroupSpec(spec.group_id, spec.c_pks, spec.s_pks, spec.t, spec.n, spec.k, spec.clip, norm_cap=8.0)
    xs, norms = _updates(5), [1.0, 2.0, 3.0, 4.0, 5.0]
    rng = np.random.default_rng(3)
    ups = {i: sa.member_mask(xs[i], spec, i, cs[i][0], keys[i][0], rng, norm=norms[i])[0] for i in range(5)}
    assert len(ups[0].payload) == (spec.k + sa.NORM_SLOTS) * spec.quantizer.bits // 8 + 13  # 32 bytes more
    total, mean_norm = sa.server_unmask_norm(spec, [a.commit_s for _, a in keys], ups,
                                             _answers(spec, cs, keys, ups, range(5)))
    assert abs(mean_norm - 3.0) < 0.8 and total.shape == (N,)  # the mean of 1..5, within 4 sigma
    assert np.isnan(sa.server_unmask_norm(*_plain_group_unmasked())[1])  # a group that did not ask


def _plain_group_unmasked():
    spec, cs, keys = _group(3)
    ups, _ = _mask_all(spec, cs, keys, _updates(3))
    return spec, [a.commit_s for _, a in keys], ups, _answers(spec, cs, keys, ups, range(3))


def test_an_adaptive_clip_follows_the_groups_mean_norm(task_identity):
    nodes = [41, 42, 43, 44]
    devs = _Devices(nodes)
    groups = SecureGroups(n=N, k=K_KEPT, clip=0.1, threshold=0.6, adapt_clip=True)
    rng = np.random.default_rng(0)
    for round_ in range(12):  # the devices' updates have norm 2: twenty times the first clip
        g = groups.open(nodes, devs.send)
        assert g.spec.norm_cap == 4 * g.spec.clip
        for i, n in enumerate(g.nodes):
            groups.bind(g, i, 1000 * round_ + i)
            x = rng.standard_normal(N).astype(np.float32)
            reply = devs.train(n, groups.train_record(g, i), 2.0 * x / np.linalg.norm(x), 0)
            groups.arrived(1000 * round_ + i, extract(reply.content), reply.content, dispatched_version=0,
                           current_version=0, max_staleness=3)
        groups.finish(g, devs.send(groups.unmask_messages(g, range(4))))
    # what a device clips is its update plus its error feedback (what earlier groups left out): norm 2 to 4 here
    assert 1.8 < groups.clip < 5.0
