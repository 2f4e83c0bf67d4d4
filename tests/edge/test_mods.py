"""Flower mods of the edge ClientApp: DP clip + noise, codec with error feedback, byte accounting; DP numerics."""

from __future__ import annotations

import math
import time

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
from scipy.stats import norm

from fedge.common import codec, wire
from fedge.common.config import FedgeConfig, load_config
from fedge.edge import node_state
from fedge.edge.mods import DP_STATE, RAW_DELTA, RESIDUAL, compression_mod, dp_mod, size_mod
from fedge.edge.privacy import REPLACE_SENSITIVITY, clip_update, gaussian_epsilon, gdp_delta, l2_norm

SHAPES = {"a.lora_A": (4, 64), "a.lora_B": (32, 4), "router.gate.weight": (4, 65)}


def _ctx(overrides: dict | None = None, node_config: dict | None = None) -> Context:
    run = load_config(overrides=overrides or {}).to_flat()
    return Context(run_id=1, node_id=7, node_config=node_config or {}, state=RecordDict(), run_config=run)


def _train_msg(state: dict[str, np.ndarray]) -> Message:
    rnd = wire.round_record(version=4, lr=0.01, local_steps=1, batch_size=8, seed=0)
    md = Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id="",
                  created_at=time.time(), ttl=3600, message_type=MessageType.TRAIN)
    return Message(content=wire.train_message_content(state, rnd), metadata=md)


def _handler(delta: dict[str, np.ndarray]):
    """A TRAIN handler that replies with a fixed float delta (what fedge.edge.client_app.train produces)."""

    def handle(msg: Message, ctxt: Context) -> Message:
        return Message(RecordDict({
            RAW_DELTA: ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in delta.items()}),
            wire.UPDATE: ConfigRecord({wire.BASE_VERSION: 4}),
            wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 10.0, wire.LOSS: 1.0}),
        }), reply_to=msg)

    return handle


def _delta(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _zeros() -> dict[str, np.ndarray]:
    return {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}


def _chain(*mods, handler):
    """Compose mods the way ClientApp does (first = outermost)."""
    from flwr.client.mod.utils import make_ffn  # what ClientApp composes its mods with

    return make_ffn(handler, list(mods))


# ------------------------------------------------------------------------------------------ compression
def test_compression_mod_emits_exactly_the_wire_format_the_server_decodes():
    delta = _delta(0)
    ctx = _ctx({"communication.topk_ratio": 0.1})
    reply = compression_mod(_train_msg(_zeros()), ctx, _handler(delta))
    assert set(reply.content.keys()) == {wire.UPDATE, wire.METRICS}  # the raw float delta never leaves
    upd = reply.content.config_records[wire.UPDATE]
    assert upd[wire.BASE_VERSION] == 4
    dec = codec.decode(upd[wire.DELTA])
    assert set(dec) == set(delta) and all(dec[k].shape == delta[k].shape for k in delta)
    assert reply.content.metric_records[wire.METRICS][wire.RAW_BYTES] == codec.raw_nbytes(delta)


def test_error_feedback_residual_is_carried_across_calls_and_survives_a_restart(tmp_path):
    node = {"state-dir": str(tmp_path / "state")}
    ctx = _ctx({"communication.topk_ratio": 0.05}, node)
    d1, d2 = _delta(1), _delta(2)
    r1 = compression_mod(_train_msg(_zeros()), ctx, _handler(d1))
    res1 = wire.record_to_adapters(ctx.state.array_records[RESIDUAL])
    p1 = codec.decode(r1.content.config_records[wire.UPDATE][wire.DELTA])
    for k in d1:  # what was not sent is kept
        np.testing.assert_allclose(p1[k] + res1[k], d1[k], atol=1e-5)
    assert l2_norm(res1) > 0.5 * l2_norm(d1)  # 5 % top-k leaves most of the mass behind
    r2 = compression_mod(_train_msg(_zeros()), ctx, _handler(d2))
    res2 = wire.record_to_adapters(ctx.state.array_records[RESIDUAL])
    p2 = codec.decode(r2.content.config_records[wire.UPDATE][wire.DELTA])
    for k in d2:  # the second payload carries the first call's residual
        np.testing.assert_allclose(p2[k] + res2[k], d2[k] + res1[k], atol=1e-5)

    # a restarted node (fresh Context.state) picks the residual up from its state dir
    fresh = _ctx({"communication.topk_ratio": 0.05}, node)
    saved, _ = node_state.load_arrays(tmp_path / "state" / node_state.RESIDUAL_FILE)
    for k in res2:
        np.testing.assert_array_equal(saved[k], res2[k])
    r2b = compression_mod(_train_msg(_zeros()), fresh, _handler(d2))
    expect, _ = codec.encode(d2, codec.CodecParams(topk_ratio=0.05), res2)
    assert r2b.content.config_records[wire.UPDATE][wire.DELTA] == expect


def test_residual_with_other_shapes_is_dropped_not_crashed_on():
    ctx = _ctx()
    ctx.state[RESIDUAL] = ArrayRecord({"a.lora_A": Array(np.ones((2, 2), np.float32))})
    reply = compression_mod(_train_msg(_zeros()), ctx, _handler(_delta(3)))
    assert not reply.has_error()
    assert set(wire.record_to_adapters(ctx.state.array_records[RESIDUAL])) == set(SHAPES)


def test_without_error_feedback_nothing_is_kept():
    ctx = _ctx({"communication.error_feedback": False})
    compression_mod(_train_msg(_zeros()), ctx, _handler(_delta(4)))
    assert RESIDUAL not in ctx.state


def test_mods_pass_evaluate_replies_through_untouched():
    ctx = _ctx({"dp.clip": 1.0, "dp.noise_multiplier": 1.0})
    msg = _train_msg(_zeros())

    def evaluate(m: Message, c: Context) -> Message:
        return Message(RecordDict({wire.METRICS: MetricRecord({wire.ACCURACY: 0.5})}), reply_to=m)

    reply = _chain(size_mod, compression_mod, dp_mod, handler=evaluate)(msg, ctx)
    assert dict(reply.content.metric_records[wire.METRICS])[wire.ACCURACY] == 0.5
    assert DP_STATE not in ctx.state and RESIDUAL not in ctx.state


# ------------------------------------------------------------------------------------------ size accounting
def test_size_mod_reports_payload_and_download_bytes_and_writes_the_ledger(tmp_path):
    ctx = _ctx({"communication.topk_ratio": 0.1}, {"state-dir": str(tmp_path), "device-id": "cam-1"})
    msg = _train_msg(_zeros())
    reply = _chain(size_mod, compression_mod, handler=_handler(_delta(5)))(msg, ctx)
    m = reply.content.metric_records[wire.METRICS]
    payload = reply.content.config_records[wire.UPDATE][wire.DELTA]
    assert m[wire.UPLOAD_BYTES] == len(payload)
    assert m[wire.DOWNLOAD_BYTES] == msg.content.array_records[wire.ARRAYS].count_bytes()
    # exactly what the codec makes of this delta (no residual yet): the ratio is the codec's ratio
    expect, _ = codec.encode(_delta(5), codec.CodecParams(topk_ratio=0.1))
    assert m[wire.UPLOAD_BYTES] == len(expect) < 0.15 * m[wire.RAW_BYTES]
    (line,) = node_state.read_jsonl(tmp_path / node_state.UPDATES_FILE)
    assert line["device"] == "cam-1" and line["base_version"] == 4 and line[wire.UPLOAD_BYTES] == len(payload)


# ------------------------------------------------------------------------------------------ DP
def test_dp_clips_the_update_to_the_configured_norm():
    ctx = _ctx({"dp.clip": 0.5, "communication.compression": "none", "communication.quant_bits": 32})
    big = _delta(6, scale=3.0)
    assert l2_norm(big) > 10
    reply = _chain(compression_mod, dp_mod, handler=_handler(big))(_train_msg(_zeros()), ctx)
    sent = codec.decode(reply.content.config_records[wire.UPDATE][wire.DELTA])
    assert l2_norm(sent) == pytest.approx(0.5, rel=1e-5)
    for k in big:  # direction kept
        np.testing.assert_allclose(sent[k], big[k] * (0.5 / l2_norm(big)), rtol=1e-4, atol=1e-7)
    small = _delta(7, scale=1e-3)
    assert clip_update(small, 0.5)[0]["a.lora_A"] == pytest.approx(small["a.lora_A"])


def test_dp_noise_has_the_configured_scale_and_is_not_seeded_by_the_round():
    clip, z = 0.2, 1.5
    ctx = _ctx({"dp.clip": clip, "dp.noise_multiplier": z, "communication.compression": "none",
                "communication.quant_bits": 32, "communication.error_feedback": False})
    chain = _chain(compression_mod, dp_mod, handler=_handler(_zeros()))
    sent = [codec.decode(chain(_train_msg(_zeros()), ctx).content.config_records[wire.UPDATE][wire.DELTA])
            for _ in range(10)]
    draws = np.stack([np.concatenate([v.ravel() for v in d.values()]) for d in sent])  # (10 replies, 644)
    x = draws.ravel()
    n = x.size  # 6440 coordinates: the sample std is within 5 sigma of z*clip (about 4.4 %)
    assert abs(x.std() / (z * clip) - 1) < 5 / math.sqrt(2 * n)
    assert abs(x.mean()) < 5 * z * clip / math.sqrt(n)
    assert not np.allclose(draws[0], draws[1])  # same round, same seed, fresh noise
    m = chain(_train_msg(_zeros()), ctx).content.metric_records[wire.METRICS]
    assert m[wire.DP_NOISE_STD] == pytest.approx(z * clip)
    assert m[wire.DP_EPSILON] == pytest.approx(gaussian_epsilon(11, z, 1e-5))  # 11 releases so far


def test_dp_release_count_survives_a_restart(tmp_path):
    node = {"state-dir": str(tmp_path)}
    over = {"dp.clip": 1.0, "dp.noise_multiplier": 2.0}
    for _ in range(2):
        _chain(compression_mod, dp_mod, handler=_handler(_delta(8)))(_train_msg(_zeros()), _ctx(over, node))
    m = _chain(compression_mod, dp_mod, handler=_handler(_delta(8)))(_train_msg(_zeros()), _ctx(over, node))
    assert m.content.metric_records[wire.METRICS][wire.DP_EPSILON] == pytest.approx(gaussian_epsilon(3, 2.0, 1e-5))


def test_dp_config_rejects_noise_without_clip():
    from fedge.common.config import ConfigError

    with pytest.raises(ConfigError, match="'dp.noise_multiplier'"):
        load_config(overrides={"dp.noise_multiplier": 1.0})
    assert FedgeConfig().dp.clip == 0  # off by default


# ------------------------------------------------------------------------------------------ accountant
def test_epsilon_matches_the_exact_gaussian_mechanism_curve():
    eps = gaussian_epsilon(1, 2.0, 1e-5)
    mu = REPLACE_SENSITIVITY / 2.0
    assert gdp_delta(eps, mu) == pytest.approx(1e-5, rel=1e-6)
    # Balle & Wang's delta for sensitivity D, noise s: Phi(D/2s - eps s/D) - e^eps Phi(-D/2s - eps s/D)
    d, s = REPLACE_SENSITIVITY, 2.0
    ref = norm.cdf(d / (2 * s) - eps * s / d) - math.exp(eps) * norm.cdf(-d / (2 * s) - eps * s / d)
    assert ref == pytest.approx(1e-5, rel=1e-6)


def test_epsilon_is_below_the_classical_and_rdp_bounds_and_grows_with_rounds():
    delta, z = 1e-5, 4.0
    for t in (1, 4, 16, 64):
        e = gaussian_epsilon(t, z, delta)
        r = REPLACE_SENSITIVITY / z  # per-release sensitivity / std
        rdp = min(t * a * r * r / 2 + math.log(1 / delta) / (a - 1) for a in np.linspace(1.01, 200, 20000))
        assert e <= rdp + 1e-9
        if t == 1:
            classical = r * math.sqrt(2 * math.log(1.25 / delta))  # valid for eps < 1
            assert e <= classical
    assert gaussian_epsilon(4, z, delta) < gaussian_epsilon(16, z, delta) < gaussian_epsilon(64, z, delta)
    assert gaussian_epsilon(0, z, delta) == 0.0
    assert gaussian_epsilon(3, 0.0, delta) == math.inf
