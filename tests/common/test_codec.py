import json
import struct
import zlib

import numpy as np
import pytest

from fedge.common import codec
from fedge.common.codec import CodecError, CodecParams, decode, encode


def _delta(seed=0):
    rng = np.random.default_rng(seed)
    return {"a.lora_A": rng.normal(size=(4, 64)).astype(np.float32),
            "b.lora_B": rng.normal(size=(128, 4)).astype(np.float32),
            "router.gate.bias": rng.normal(size=(4,)).astype(np.float32),
            "empty": np.zeros((0, 3), dtype=np.float32)}


@pytest.mark.parametrize("bits", [32, 8, 4])
def test_dense_round_trip_error_bounded_by_quantization_step(bits):
    d = _delta()
    out = decode(encode(d, CodecParams(topk_ratio=1.0, bits=bits, error_feedback=False))[0])
    for k, v in d.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
        if v.size:
            qmax = {32: None, 8: 127, 4: 7}[bits]
            bound = 1e-7 if qmax is None else np.abs(v).max() / qmax / 2 + 1e-6
            assert np.abs(out[k] - v).max() <= bound


def test_topk_keeps_the_largest_entries_across_all_tensors():
    d = _delta()
    out = decode(encode(d, CodecParams(topk_ratio=0.1, bits=32, error_feedback=False))[0])
    v = np.concatenate([d[k].ravel() for k in sorted(d)])
    o = np.concatenate([out[k].ravel() for k in sorted(d)])
    k = int(round(0.1 * v.size))
    top = np.argsort(-np.abs(v))[:k]
    assert np.count_nonzero(o) == k
    np.testing.assert_allclose(o[top], v[top])


def test_varint_round_trip_large_gaps():
    vals = np.array([0, 1, 127, 128, 16383, 16384, 2**21, 2**28 + 5, 2**31 - 1], dtype=np.int64)
    assert np.array_equal(codec._varint_decode(codec._varint_encode(vals), len(vals)), vals)


def test_error_feedback_residual_is_what_compression_lost():
    d = _delta()
    p = CodecParams(topk_ratio=0.05, bits=8)
    payload, res = encode(d, p, None)
    out = decode(payload)
    for k in d:
        np.testing.assert_allclose(out[k] + res[k], d[k], atol=1e-5)
    # next round adds the residual back before compressing
    payload2, _ = encode({k: np.zeros_like(v) for k, v in d.items()}, p, res)
    assert any(np.any(v != 0) for v in decode(payload2).values())


def test_compression_ratio_at_5_percent_int8_is_over_20x():
    rng = np.random.default_rng(0)
    d = {"w": rng.normal(size=(256, 256)).astype(np.float32)}
    payload, _ = encode(d, CodecParams(topk_ratio=0.05, bits=8))
    assert codec.raw_nbytes(d) / len(payload) >= 20


def _valid():
    return encode(_delta(), CodecParams(topk_ratio=0.1, bits=8))[0]


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("mutate,match", [
    (lambda p: p[:-7], "CRC|truncated"),
    (lambda p: p[:5], "truncated"),
    (lambda p: b"XXXX" + p[4:], "magic"),
    (lambda p: p[:4] + bytes([99]) + p[5:], "version"),
    (lambda p: p[:40] + bytes([p[40] ^ 0xFF]) + p[41:], "CRC"),
    (lambda p: _recrc(p[:-4] + b"junk"), "add up"),
    (lambda p: _recrc(p[:9] + b"{not json" + p[18:-4]), "header"),
    (lambda p: "a string", "bytes"),
])
def test_corrupt_truncated_and_wrong_version_payloads_are_refused(mutate, match):
    with pytest.raises(CodecError, match=match):
        decode(mutate(_valid()))


def test_nan_payload_refused_on_decode_and_never_encoded():
    p = _valid()
    hlen = struct.unpack_from("<I", p, 5)[0]
    import json
    header = json.loads(zlib.decompress(p[9:9 + hlen]))
    header["tensors"][0][4] = float("nan")
    h2 = zlib.compress(json.dumps(header).encode())
    body = p[:5] + struct.pack("<I", len(h2)) + h2 + p[9 + hlen:-4]
    with pytest.raises(CodecError, match="scale"):
        decode(_recrc(body))
    bad = _delta()
    bad["a.lora_A"][0, 0] = np.nan
    with pytest.raises(CodecError, match="non-finite"):
        encode(bad, CodecParams())
    bad["a.lora_A"][0, 0] = np.inf
    with pytest.raises(CodecError, match="non-finite"):
        encode(bad, CodecParams(topk_ratio=1.0, bits=32))


def test_float32_payload_with_inf_value_refused():
    body, _ = encode({"w": np.ones(4, np.float32)}, CodecParams(topk_ratio=1.0, bits=32, error_feedback=False))
    raw = bytearray(body[:-4])
    raw[-4:] = struct.pack("<f", float("inf"))
    with pytest.raises(CodecError, match="non-finite"):
        decode(_recrc(bytes(raw)))


def _header_bomb(elements: int = 1 << 31) -> bytes:
    """A well-formed ~100-byte payload whose header declares one huge all-zero tensor (k = 0)."""
    header = {"bits": 8, "n": elements, "k": 0, "idx_len": 0, "val_len": 0,
              "tensors": [["a", [elements], "float32", 0, 1.0]]}
    h = zlib.compress(json.dumps(header).encode(), 9)
    body = codec.MAGIC + struct.pack("<BI", codec.FORMAT_VERSION, len(h)) + h
    return body + struct.pack("<I", zlib.crc32(body))


def test_declared_sizes_are_checked_against_the_expected_layout_before_any_allocation():
    bomb = _header_bomb()
    assert len(bomb) < 200
    with pytest.raises(codec.LayoutError) as e:
        decode(bomb, expected={"a": (4, 3)})
    assert e.value.field == "shape"
    with pytest.raises(codec.LayoutError) as e:
        decode(bomb, expected={"b": (1 << 31,)})
    assert e.value.field == "keys"
    small = _header_bomb(12)
    np.testing.assert_array_equal(decode(small, expected={"a": (12,)})["a"], np.zeros(12, np.float32))
