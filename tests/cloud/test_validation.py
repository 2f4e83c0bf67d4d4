"""cloud/validation.py: every bad update is refused with its reason, a good one passes (clipped if asked)."""

import json
import struct
import zlib

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedge.cloud.validation import RawUpdate, Reason, RejectionCounter, UpdateRejected, extract, validate
from fedge.common import codec, wire

REF = {"a": np.zeros((4, 3), np.float32), "b": np.zeros(6, np.float32)}
DENSE = codec.CodecParams(topk_ratio=1.0, bits=32, error_feedback=False)


def _payload(delta, params=DENSE):
    return codec.encode(delta, params)[0]


def _good(scale=0.1):
    rng = np.random.default_rng(0)
    return {k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in REF.items()}


def _poison(payload, index, value):
    """Overwrite one float32 value of a dense 32-bit payload and fix the CRC (a well-formed evil payload)."""
    n = sum(v.size for v in REF.values())
    body = bytearray(payload[:-4])
    start = len(body) - 4 * n
    struct.pack_into("<f", body, start + 4 * index, value)
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def _check(payload, base=3, **kw):
    opts = dict(reference=REF, current_version=5, oldest_version=0, max_staleness=3, max_norm=10.0,
                norm_action="reject")
    opts.update(kw)
    return validate(RawUpdate(payload=payload, base_version=base, metrics={wire.NUM_EXAMPLES: 10.0}), **opts)


def _reason(payload, **kw):
    with pytest.raises(UpdateRejected) as e:
        _check(payload, **kw)
    return e.value.reason


def test_good_update_passes_with_its_staleness():
    u = _check(_payload(_good()))
    assert u.staleness == 2 and u.num_examples == 10.0 and not u.clipped
    np.testing.assert_allclose(u.delta["a"], _good()["a"], rtol=1e-6)


def test_nan_and_inf_are_refused():
    assert _reason(_poison(_payload(_good()), 2, float("nan"))) == Reason.NONFINITE
    assert _reason(_poison(_payload(_good()), 7, float("inf"))) == Reason.NONFINITE


def test_garbage_and_truncated_payloads_are_refused():
    assert _reason(b"\x00" * 100) == Reason.DECODE
    assert _reason(_payload(_good())[:-9]) == Reason.DECODE
    assert _reason(bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8))) == Reason.DECODE


def test_wrong_shape_and_wrong_keys_are_refused():
    g = _good()
    assert _reason(_payload({"a": np.zeros((3, 4), np.float32), "b": g["b"]})) == Reason.SHAPE
    assert _reason(_payload({"a": g["a"], "c": g["b"]})) == Reason.KEYS
    assert _reason(_payload({"a": g["a"]})) == Reason.KEYS


def test_oversized_norm_is_rejected_or_clipped_as_configured():
    big = _payload(_good(scale=100.0))
    assert _reason(big) == Reason.NORM
    u = _check(big, norm_action="clip")
    assert u.clipped and u.norm > 10.0
    assert np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in u.delta.values())) == pytest.approx(10.0, 1e-4)


def test_oversized_payload_is_refused_before_decoding():
    assert _reason(b"FDGC" + b"\x00" * 200_000) == Reason.OVERSIZED_PAYLOAD


def test_unknown_and_too_stale_base_versions_are_refused():
    p = _payload(_good())
    assert _reason(p, base=6) == Reason.UNKNOWN_VERSION  # from the future
    assert _reason(p, base=1, oldest_version=2) == Reason.UNKNOWN_VERSION  # before a rebase
    assert _reason(p, base=1) == Reason.STALE  # 5 - 1 = 4 > 3


def test_extract_refuses_malformed_replies():
    with pytest.raises(UpdateRejected) as e:
        extract(RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1.0})}))
    assert e.value.reason == Reason.MALFORMED
    with pytest.raises(UpdateRejected) as e:
        extract(RecordDict({wire.UPDATE: ConfigRecord({wire.BASE_VERSION: "x", wire.DELTA: b"1"})}))
    assert e.value.reason == Reason.MALFORMED
    ok = extract(wire.update_content(base_version=2, payload=b"abc", metrics={wire.NUM_EXAMPLES: 3}))
    assert ok.base_version == 2 and ok.payload == b"abc" and ok.metrics[wire.NUM_EXAMPLES] == 3.0


def test_rejection_counter_counts_per_reason():
    c = RejectionCounter()
    for r in (Reason.NONFINITE, Reason.NONFINITE, Reason.STALE):
        c.add(r)
    assert c.as_dict() == {"nonfinite": 2, "stale": 1} and c.total == 3


def test_header_bomb_is_refused_by_shape_without_allocating_what_it_declares():
    header = {"bits": 8, "n": 1 << 31, "k": 0, "idx_len": 0, "val_len": 0,
              "tensors": [["a", [1 << 30, 2], "float32", 0, 1.0]]}
    h = zlib.compress(json.dumps(header).encode(), 9)
    body = codec.MAGIC + struct.pack("<BI", codec.FORMAT_VERSION, len(h)) + h
    bomb = body + struct.pack("<I", zlib.crc32(body))
    assert _reason(bomb) == Reason.KEYS  # "b" is missing; names are compared first


@pytest.mark.parametrize(("run_scope", "sent_scope"), [("full", "adapters"), ("adapters", "partial"),
                                                       ("partial", "full")])
def test_an_update_of_another_train_scope_is_refused_with_keys(run_scope, sent_scope):
    """The server's reference is the global state of the run's scope; a device on another scope is refused."""
    from fedge.common.lora import apply_lora
    from fedge.common.model import build_model
    from fedge.common.scope import trainable_state

    m = apply_lora(build_model(seed=0), rank=4, alpha=8.0)
    ref = {k: v.numpy() for k, v in trainable_state(m, run_scope).items()}
    sent = {k: np.full_like(v.numpy(), 1e-3) for k, v in trainable_state(m, sent_scope).items()}
    same = {k: np.full_like(v, 1e-3) for k, v in ref.items()}
    wire_codec = codec.CodecParams(topk_ratio=0.05, bits=8, error_feedback=False)  # as devices send them
    assert _check(_payload(same, wire_codec), reference=ref, max_norm=1e9).delta.keys() == ref.keys()
    with pytest.raises(UpdateRejected) as e:
        _check(_payload(sent, wire_codec), reference=ref, max_norm=1e9)
    assert e.value.reason is Reason.KEYS and ("missing" in e.value.detail or "unexpected" in e.value.detail)
