"""common/scope.py: which parameters each train.scope trains, sends and accepts."""

import pytest
import torch

from fedge.common.lora import apply_lora, is_adapter_key
from fedge.common.model import build_model
from fedge.common.scope import (SCOPES, ScopeError, load_trainable_state, scope_keys, scope_layout, set_trainable,
                          trainable_state)


def _model():
    return apply_lora(build_model(seed=0), rank=4, alpha=8.0)


def test_scopes_nest_from_adapters_to_every_parameter():
    m = _model()
    adapters, partial, full = (scope_keys(m, s) for s in SCOPES)
    assert adapters == {n for n, _ in m.named_parameters() if is_adapter_key(n)}
    assert adapters < partial < full == {n for n, _ in m.named_parameters()}


def test_partial_trains_norms_each_encoders_last_block_and_the_head_but_not_early_layers_or_expert_bases():
    m = _model()
    keys = scope_keys(m, "partial")
    for enc in ("image", "audio"):
        convs = [n for n, mod in m.encoders[enc].named_modules() if isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d))]
        assert f"encoders.{enc}.{convs[-1]}.weight" in keys  # the encoder's last convolution
        assert f"encoders.{enc}.{convs[0]}.weight" not in keys  # its first one stays frozen
        assert f"encoders.{enc}.norm.weight" in keys
        assert f"encoders.{enc}.proj.base.weight" in keys
    assert {"head.fc1.base.weight", "head.fc2.base.weight", "head.norm.weight"} <= keys
    assert not any(k.startswith("experts.") and ".base." in k for k in keys)


@pytest.mark.parametrize("scope", SCOPES)
def test_set_trainable_and_state_follow_the_scope(scope):
    m = set_trainable(_model(), scope)
    want = scope_keys(m, scope)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == want
    st = trainable_state(m, scope)
    assert list(st) == sorted(want)
    assert scope_layout(m, scope) == {k: tuple(v.shape) for k, v in st.items()}


def test_a_state_of_another_scope_is_refused_naming_the_scope():
    m = _model()
    with pytest.raises(ScopeError, match="train.scope='full'"):
        load_trainable_state(m, trainable_state(m, "adapters"), "full")
    bad = trainable_state(m, "partial")
    bad["head.fc1.base.weight"] = torch.zeros(3, 3)
    with pytest.raises(ScopeError, match="shape"):
        load_trainable_state(m, bad, "partial")


def test_loading_a_full_state_moves_base_weights_and_leaves_nothing_else():
    a, b = _model(), apply_lora(build_model(seed=1), rank=4, alpha=8.0)
    load_trainable_state(a, trainable_state(b, "full"), "full")
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)
    with pytest.raises(ValueError, match="must be one of"):
        scope_keys(a, "everything")
