import itertools

import pytest
import torch

from fedge.common.model import build_model, load_balancing_loss, top_k_gating

B, S, MELS, T = 6, 32, 40, 32


def _inputs(b=B):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, S, S, generator=g), torch.randn(b, MELS, T, generator=g)


@pytest.mark.parametrize("subset", [("image",), ("audio",), ("image", "audio")])
def test_every_modality_subset_gives_logits_and_gradients(subset):
    model = build_model(num_classes=10, seed=0)
    img, aud = _inputs()
    out = model(image=img if "image" in subset else None, audio=aud if "audio" in subset else None)
    assert out.logits.shape == (B, 10)
    (out.logits.sum() + out.aux_loss).backward()
    enc_grads = {m: any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders[m].parameters())
                 for m in ("image", "audio")}
    for m in ("image", "audio"):
        assert enc_grads[m] == (m in subset), "a missing modality's encoder must not run"
    assert all(p.grad is not None for p in model.head.parameters())


def test_mixed_masks_per_sample_and_missing_modality_gets_zero_fusion_weight():
    model = build_model(seed=0)
    img, aud = _inputs()
    masks = torch.tensor(list(itertools.islice(itertools.cycle([[1, 1], [1, 0], [0, 1]]), B)), dtype=torch.bool)
    out = model(image=img, audio=aud, mask=masks)
    assert out.logits.shape == (B, 10)
    assert torch.all(out.fusion_weights[~masks] == 0)
    assert torch.allclose(out.fusion_weights.sum(1), torch.ones(B))
    # a missing modality's input content must not matter (it is masked, not zeroed data)
    aud2 = aud.clone()
    aud2[~masks[:, 1]] = 1e3
    out2 = model(image=img, audio=aud2, mask=masks)
    assert torch.allclose(out.logits, out2.logits, atol=1e-5)


def test_sample_without_any_modality_is_refused():
    model = build_model(seed=0)
    img, aud = _inputs(2)
    with pytest.raises(ValueError, match="at least one"):
        model(image=img, audio=aud, mask=torch.tensor([[True, False], [False, False]]))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exactly_k_experts_active_per_token(k):
    model = build_model(num_experts=4, top_k=k, seed=0)
    img, aud = _inputs()
    out = model(image=img, audio=aud)
    n_tokens = 2 * B
    assert out.topk_idx.shape == (n_tokens, k)
    for row in out.topk_idx:
        assert len(set(row.tolist())) == k
    assert int(out.expert_counts.sum()) == n_tokens * k


def test_dense_mode_uses_all_experts():
    model = build_model(num_experts=4, dense=True, seed=0)
    img, aud = _inputs()
    out = model(image=img, audio=aud)
    assert out.topk_idx.shape == (2 * B, 4)
    assert float(out.aux_loss) == 0.0


def test_load_balancing_loss_matches_hand_computed_case():
    # 4 tokens, 2 experts, top-1. probs rows: tokens 0,1,2 -> expert 0; token 3 -> expert 1
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    idx = torch.tensor([[0], [0], [0], [1]])
    # f = [3/4, 1/4]; P = [2.6/4, 1.4/4] = [0.65, 0.35]; loss = 2 * (0.75*0.65 + 0.25*0.35) = 1.15
    assert float(load_balancing_loss(probs, idx, 2)) == pytest.approx(1.15)
    # uniform routing gives exactly 1
    probs_u = torch.full((4, 2), 0.5)
    assert float(load_balancing_loss(probs_u, torch.tensor([[0], [1], [0], [1]]), 2)) == pytest.approx(1.0)


def test_top_k_gates_renormalised():
    probs, idx, gates = top_k_gating(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), 2)
    assert idx.tolist() == [[0, 1]]
    assert torch.allclose(gates.sum(-1), torch.ones(1))
    assert gates[0, 0] / gates[0, 1] == pytest.approx(float(probs[0, 0] / probs[0, 1]))


def test_capacity_factor_drops_overflow_tokens():
    model = build_model(num_experts=4, top_k=1, capacity_factor=0.25, seed=0)
    img, aud = _inputs(16)
    out = model(image=img, audio=aud)
    assert out.dropped_tokens > 0
    assert out.logits.shape == (16, 10)


def test_build_model_is_deterministic_per_seed():
    a, b, c = build_model(seed=3), build_model(seed=3), build_model(seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# ---------------------------------------------------------------------- modality-affine experts
def _groups_of(model):
    return [set(model.groups[m]) for m in ("image", "audio")]


@pytest.mark.parametrize("num_experts,shared,k", [(4, 0, 1), (4, 0, 2), (6, 2, 3), (5, 1, 2)])
def test_modality_affinity_routes_every_token_to_exactly_k_experts_of_its_group(num_experts, shared, k):
    model = build_model(num_experts=num_experts, shared_experts=shared, top_k=k, expert_affinity="modality", seed=1)
    img, aud = _inputs()
    masks = torch.tensor(list(itertools.islice(itertools.cycle([[1, 1], [1, 0], [0, 1]]), B)), dtype=torch.bool)
    out = model(image=img, audio=aud, mask=masks)
    token_mod = torch.arange(2).expand(B, 2).reshape(-1)[masks.reshape(-1)]  # sample-major, as the model routes
    groups = _groups_of(model)
    assert out.topk_idx.shape == (int(masks.sum()), k)
    for row, j in zip(out.topk_idx.tolist(), token_mod.tolist()):
        assert len(set(row)) == k and set(row) <= groups[j]
    for p, j in zip(out.router_probs.detach(), token_mod.tolist()):
        outside = [e for e in range(num_experts) if e not in groups[j]]
        assert torch.all(p[outside] == 0) and float(p.sum()) == pytest.approx(1.0)
    (out.logits.sum() + out.aux_loss).backward()
    assert model.router.gate.weight.grad is not None and torch.isfinite(model.router.gate.weight.grad).all()


def test_modality_groups_partition_private_experts_and_share_the_last_ones():
    model = build_model(num_experts=6, shared_experts=2, top_k=2, expert_affinity="modality", seed=0)
    assert model.groups == {"image": (0, 1, 4, 5), "audio": (2, 3, 4, 5)}
    assert build_model(seed=0).groups == {"image": (0, 1, 2, 3), "audio": (0, 1, 2, 3)}


def test_modality_affinity_stays_in_group_even_when_outside_logits_dominate():
    # in-group probabilities underflow to 0 in float32: the top-k must still come from the allowed experts
    logits = torch.tensor([[500.0, 400.0, 0.0, -1.0]])
    allowed = torch.tensor([[False, False, True, True]])
    probs, idx, gates = top_k_gating(logits, 2, allowed)
    assert sorted(idx[0].tolist()) == [2, 3] and torch.all(probs[0, :2] == 0)
    assert torch.allclose(gates.sum(-1), torch.ones(1))


def test_dense_modality_mode_mixes_every_expert_of_the_group():
    model = build_model(num_experts=6, shared_experts=2, dense=True, expert_affinity="modality", seed=0)
    img, aud = _inputs()
    out = model(image=img, audio=aud)
    assert out.topk_idx.shape == (2 * B, 4)  # the group: 2 private + 2 shared experts
    assert out.topk_idx[0].tolist() == [0, 1, 4, 5] and out.topk_idx[1].tolist() == [2, 3, 4, 5]
    assert model.experts_per_token == 4 and float(out.aux_loss) == 0.0
    # it equals top-k with k = the group size (what the exported router computes)
    sparse = build_model(num_experts=6, shared_experts=2, top_k=4, expert_affinity="modality", seed=0)
    assert torch.allclose(sparse(image=img, audio=aud).logits, out.logits, atol=1e-5)


def test_shared_affinity_is_the_default_and_adds_nothing_to_the_state():
    a, b = build_model(seed=5), build_model(seed=5, expert_affinity="shared")
    img, aud = _inputs()
    assert torch.equal(a(image=img, audio=aud).logits, b(image=img, audio=aud).logits)
    grouped = build_model(seed=5, expert_affinity="modality")
    assert list(grouped.state_dict()) == list(a.state_dict())  # same federated/LoRA state, no routing buffer
    assert all(torch.equal(grouped.state_dict()[k], v) for k, v in a.state_dict().items())


def test_modality_affinity_refuses_bad_layouts_and_needs_token_modalities():
    with pytest.raises(ValueError, match="top_k=3 must be <= the 2 experts"):
        build_model(num_experts=4, top_k=3, expert_affinity="modality")
    with pytest.raises(ValueError, match="positive multiple"):
        build_model(num_experts=4, shared_experts=1, top_k=1, expert_affinity="modality")
    with pytest.raises(ValueError, match="needs expert_affinity='modality'"):
        build_model(shared_experts=1)
    with pytest.raises(ValueError, match="must be one of"):
        build_model(expert_affinity="per-speaker")
    model = build_model(expert_affinity="modality", seed=0)
    with pytest.raises(ValueError, match="modality index"):
        model.route(torch.zeros(2, model.dim), torch.ones(2))
