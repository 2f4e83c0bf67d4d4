"""Batched expert compute (fedge.common.experts) against a per-expert reference loop, inside the model, with LoRA."""

import pytest
import torch

from fedge.common.experts import expert_slots, moe_dense, moe_topk, stack_experts
from fedge.common.lora import apply_lora
from fedge.common.model import build_model

B, S, MELS, T = 6, 32, 40, 32


def _inputs(b=B):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, S, S, generator=g), torch.randn(b, MELS, T, generator=g)


def _reference_topk(experts, x, idx, gates, capacity=None):
    """The plain per-expert loop: token-major order, earlier tokens win a full expert."""
    n, k = idx.shape
    out, dropped = x.clone(), 0
    flat, tok, g = idx.reshape(-1), torch.arange(n).repeat_interleave(k), gates.reshape(-1)
    for e, expert in enumerate(experts):
        sel = (flat == e).nonzero(as_tuple=True)[0]
        if capacity is not None and sel.numel() > capacity:
            dropped += int(sel.numel() - capacity)
            sel = sel[:capacity]
        if sel.numel():
            out = out.index_add(0, tok[sel], expert(x[tok[sel]]) * g[sel].unsqueeze(-1))
    return out, dropped


@pytest.mark.parametrize("capacity", [None, 1, 3])
def test_grouped_experts_equal_the_per_expert_loop_and_drop_the_later_tokens(capacity):
    model = build_model(num_experts=4, top_k=2, seed=0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, model.dim, generator=g)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(9)])  # (N, k) distinct per token
    gates = torch.rand(9, 2, generator=g)
    with torch.no_grad():
        got, dropped = moe_topk(x, idx, gates, stack_experts(model.experts), capacity=capacity)
        want, want_dropped = _reference_topk(model.experts, x, idx, gates, capacity)
    assert dropped == want_dropped
    assert torch.allclose(got, want, atol=1e-5)


def test_slots_rank_tokens_in_order_within_each_expert():
    idx = torch.tensor([[0, 1], [1, 2], [0, 1]])
    slot, keep, c = expert_slots(idx, 3, capacity=None)
    assert c == 3  # expert 1 is the fullest
    assert slot.tolist() == [0, 3, 4, 6, 1, 5]  # row e*C + rank
    slot, keep, c = expert_slots(idx, 3, capacity=2)
    assert c == 2 and keep.tolist() == [True, True, True, True, True, False]


def test_no_tokens_gives_an_empty_output():
    model = build_model(num_experts=4, top_k=2, seed=0)
    w = stack_experts(model.experts)
    out, dropped = moe_topk(torch.zeros(0, model.dim), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), w)
    assert out.shape == (0, model.dim) and dropped == 0


def test_dense_mixing_equals_the_per_expert_sum():
    model = build_model(num_experts=5, seed=0)
    g = torch.Generator().manual_seed(4)
    x, probs = torch.randn(7, model.dim, generator=g), torch.rand(7, 5, generator=g).softmax(-1)
    with torch.no_grad():
        want = x + sum(probs[:, e : e + 1] * model.experts[e](x) for e in range(5))
        assert torch.allclose(moe_dense(x, probs, stack_experts(model.experts)), want, atol=1e-5)


@pytest.mark.parametrize("affinity,experts,shared", [("shared", 4, 0), ("modality", 6, 2)])
def test_routing_to_every_expert_gives_the_dense_outputs(affinity, experts, shared):
    group = experts if affinity == "shared" else (experts - shared) // 2 + shared
    kw = {"num_experts": experts, "expert_affinity": affinity, "shared_experts": shared, "seed": 0}
    dense, routed = build_model(dense=True, **kw).eval(), build_model(top_k=group, **kw).eval()
    img, aud = _inputs()
    mask = torch.tensor([[True, True], [True, False], [False, True]] * 2)
    with torch.no_grad():
        a, b = dense(image=img, audio=aud, mask=mask), routed(image=img, audio=aud, mask=mask)
    assert torch.equal(a.topk_idx.sort(dim=1).values, b.topk_idx.sort(dim=1).values)
    assert torch.allclose(a.logits, b.logits, atol=1e-5)


def test_gradients_reach_the_chosen_experts_and_the_router_only():
    model = build_model(num_experts=8, top_k=1, seed=0)
    img, aud = _inputs(2)
    out = model(image=img, audio=aud)
    (out.logits.sum() + out.aux_loss).backward()
    chosen = set(out.topk_idx.reshape(-1).tolist())
    assert len(chosen) < 8  # 4 tokens, one expert each: some experts idle
    for e, expert in enumerate(model.experts):
        grad = sum(float(p.grad.abs().sum()) for p in expert.parameters() if p.grad is not None)
        assert (grad > 0) == (e in chosen), f"expert {e}: grad {grad}, chosen {sorted(chosen)}"
    assert float(model.router.gate.weight.grad.abs().sum()) > 0


def test_lora_adapters_on_experts_change_outputs_and_get_gradients():
    base = build_model(num_experts=4, top_k=2, seed=0)
    lora = apply_lora(build_model(num_experts=4, top_k=2, seed=0), rank=2, alpha=4.0)
    img, aud = _inputs()
    assert torch.allclose(base(image=img, audio=aud).logits, lora(image=img, audio=aud).logits, atol=1e-6)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.startswith("experts.") and "lora_B" in name:
                p.normal_(0, 0.5)
    x = torch.randn(5, base.dim)
    idx, gates = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]]), torch.rand(5, 2)
    got, _ = moe_topk(x, idx, gates, stack_experts(lora.experts))
    want, _ = _reference_topk(lora.experts, x, idx, gates)  # LoRALinear's own forward
    assert torch.allclose(got, want, atol=1e-5)
    got.sum().backward()
    for e in range(4):
        assert float(lora.experts[e].fc1.lora_A.grad.abs().sum()) > 0
        assert lora.experts[e].fc1.base.weight.grad is None  # the base stays frozen


def test_stacked_weights_are_reused_without_gradients_and_restacked_when_a_weight_changes():
    import copy

    from fedge.common.experts import ExpertStack

    model = build_model(num_experts=4, top_k=2, seed=0)
    stack = ExpertStack()
    with torch.no_grad():
        w = stack(model.experts)
        assert stack(model.experts) is w  # nothing changed: reused
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(*_inputs()).logits.sum().backward()
    opt.step()  # in place: the version counters move
    with torch.no_grad():
        w2 = stack(model.experts)
        assert w2 is not w and torch.equal(w2.w1, stack_experts(model.experts).w1)
        model.load_state_dict(build_model(num_experts=4, top_k=2, seed=1).state_dict())
        w3 = stack(model.experts)
        assert not torch.equal(w3.w1, w2.w1) and torch.equal(w3.w1, stack_experts(model.experts).w1)
        apply_lora(model)  # layers replaced: LoRA factors are folded in from now on
        for e in model.experts:
            e.fc1.lora_B.fill_(0.5)
        assert torch.equal(stack(model.experts).w1, stack_experts(model.experts).w1)
        assert not torch.equal(stack(model.experts).w1, w3.w1)
        twin = copy.deepcopy(model)  # a copy stacks its own parameters
        twin.experts[0].fc2.base.bias.add_(1.0)
        assert torch.equal(twin._expert_weights(twin.experts).b2, stack_experts(twin.experts).b2)
    assert stack(model.experts).w1.requires_grad  # with gradients on: restacked, gradients reach each expert


def test_eval_forward_is_unchanged_by_the_cache_and_the_router_softmax():
    from fedge.common.experts import expert_softmax

    logits = torch.randn(50, 8)
    assert torch.allclose(expert_softmax(logits), logits.softmax(dim=-1), atol=1e-7)
    model = build_model(num_experts=8, top_k=2, seed=0).eval()
    image, audio = _inputs()
    with torch.no_grad():
        a = model(image, audio).logits
        b = model(image, audio).logits  # second call uses the cached stack
    c = model(image, audio)  # gradients on: restacked
    assert torch.equal(a, b) and torch.allclose(a, c.logits, atol=1e-6)
    assert float(c.aux_loss) > 0.0  # the balancing loss is there for training
