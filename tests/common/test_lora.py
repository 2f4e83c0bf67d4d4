import pytest
import torch

from fedge.common.lora import (adapter_state, apply_lora, base_state, is_adapter_key, load_adapter_state,
                         load_base_state, merge_lora)
from fedge.common.model import build_model


def _lora_model(seed=0):
    m = build_model(seed=seed)
    return apply_lora(m, rank=4, alpha=8.0)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.rand(5, 3, 32, 32, generator=g), torch.randn(5, 40, 32, generator=g)


def test_only_adapters_are_trainable():
    m = _lora_model()
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(is_adapter_key(n) for n in trainable)
    assert any(".experts." in f".{n}" and "lora_A" in n for n in trainable)
    assert any(n.startswith("head.") and "lora_B" in n for n in trainable)


def test_fresh_adapters_do_not_change_outputs():
    base, lora = build_model(seed=0), _lora_model()
    img, aud = _inputs()
    assert torch.allclose(base(image=img, audio=aud).logits, lora(image=img, audio=aud).logits, atol=1e-6)


def test_merge_gives_same_outputs_as_base_plus_adapters():
    m = _lora_model()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    img, aud = _inputs()
    m.eval()
    before = m(image=img, audio=aud).logits
    merge_lora(m)
    after = m(image=img, audio=aud).logits
    assert torch.allclose(before, after, atol=1e-5)
    assert all(float(p.abs().sum()) == 0 for n, p in m.named_parameters() if "lora_B" in n)
    # the merged base loaded into a plain model reproduces the outputs without any adapter
    plain = build_model(seed=0)
    plain.load_state_dict(base_state(m))
    plain.eval()
    assert torch.allclose(plain(image=img, audio=aud).logits, before, atol=1e-5)


def test_adapter_state_round_trip_and_mismatch_errors():
    a, b = _lora_model(), _lora_model()
    st = adapter_state(a)
    with torch.no_grad():
        for v in st.values():
            v.add_(0.5)
    load_adapter_state(b, st)
    assert all(torch.equal(adapter_state(b)[k], st[k]) for k in st)
    bad = dict(st)
    k0 = next(iter(bad))
    bad[k0] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(b, bad)
    bad = dict(st)
    bad.pop(k0)
    with pytest.raises(KeyError, match="missing"):
        load_adapter_state(b, bad)


def test_load_base_state_into_lora_model():
    src = build_model(seed=5)
    m = _lora_model(seed=0)
    load_base_state(m, src.state_dict())
    img, aud = _inputs()
    src.eval(), m.eval()
    assert torch.allclose(src(image=img, audio=aud).logits, m(image=img, audio=aud).logits, atol=1e-6)
