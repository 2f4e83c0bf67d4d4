"""The routed experts as one ONNX graph in the batched form of :func:`fedge.common.experts.moe_topk`.

Inputs ``token`` (N, d) float32, ``topk_idx`` (N, k) int64 (global expert ids, mapped to the graph's own stack
first), ``gates`` (N, k) float32; output ``out`` (N, d) =
``token + sum_k gates[:, k] * expert_{topk_idx[:, k]}(token)`` with every expert's weights stacked as
initializers. The graph does what the torch code does, with shapes decided at run time::

    onehot (A, E) = topk_idx.flatten()[:, None] == arange(E)          A = N*k assignments, token-major
    rank (A,)     = (cumsum(onehot, 0) * onehot).sum(1) - 1            position inside the expert's group
    C             = max over experts of onehot.sum(0)                  the fullest expert (no capacity)
    buf (E*C, d)  = scatter token[a // k] to row topk_idx[a] * C + rank[a]
    y (E, C, d)   = gelu(buf @ w1 + b1) @ w2 + b2                      one batched MatMul per layer
    out           = token + (y[slots] * gates).reshape(N, k, d).sum(1)

so a runtime computes each expert only on the tokens routed to it, in one session call, instead of one call per
expert. Hand-built with ``onnx.helper``: the exporter cannot trace the data-dependent group size C. The erf
form of GELU is spelled out (opset 18 has no Gelu), matching :func:`torch.nn.functional.gelu`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fedge.common.experts import moe_topk, stack_experts

__all__ = ["OPSET", "BatchedExperts", "batched_expert_groups", "batched_experts_onnx", "example_inputs"]

OPSET = 18


def _local_ids(ids: Sequence[int], num_experts: int) -> Tensor:
    """(num_experts,) int64: global expert id -> its position in ``ids`` (0 for an expert not in ``ids``)."""
    table = torch.zeros(num_experts, dtype=torch.long)
    table[list(ids)] = torch.arange(len(ids))
    return table


class BatchedExperts(nn.Module):
    """Torch twin of the graph (the agreement reference): (token, topk_idx, gates) -> out (N, d).

    ``ids`` are the global indices of ``experts`` (a modality's group); ``topk_idx`` holds global indices, all
    inside ``ids``.
    """

    local: Tensor  # (num_experts,) int64 buffer: global expert id -> position in ``experts``

    def __init__(self, experts: Sequence[nn.Module], ids: Sequence[int], num_experts: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.register_buffer("local", _local_ids(ids, num_experts), persistent=False)

    def forward(self, token: Tensor, topk_idx: Tensor, gates: Tensor) -> Tensor:
        return moe_topk(token, self.local[topk_idx], gates, stack_experts(self.experts))[0]


def batched_experts_onnx(experts: Sequence[nn.Module], ids: Sequence[int], num_experts: int,
                         *, opset: int = OPSET) -> bytes:
    """Serialized ONNX model computing the MoE residual of ``experts`` (plain or LoRA ``fc1``/``fc2``).

    ``ids`` are their global indices among the model's ``num_experts``: the graph maps ``topk_idx`` to positions
    in its own stack first, so one graph can hold one modality's group.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if len(ids) != len(experts) or len(set(ids)) != len(ids) or not all(0 <= e < num_experts for e in ids):
        raise ValueError(f"ids {list(ids)} must name each of the {len(experts)} experts once, in [0, {num_experts})")
    with torch.no_grad():
        w = stack_experts(experts)
    e_count, d, hidden = (int(v) for v in w.w1.shape)

    def init(name: str, value: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(value, name)

    def f32(t: Tensor) -> np.ndarray:
        return t.detach().cpu().float().numpy()

    def i64(*v: int) -> np.ndarray:
        return np.asarray(v, np.int64)

    inits = [
        init("w1", f32(w.w1)), init("b1", f32(w.b1).reshape(e_count, 1, hidden)),
        init("w2", f32(w.w2)), init("b2", f32(w.b2).reshape(e_count, 1, d)),
        init("expert_ids", np.arange(e_count, dtype=np.int64)),
        init("local_ids", _local_ids(ids, num_experts).numpy()),
        init("E", i64(e_count)), init("d", i64(d)), init("minus_one", i64(-1)), init("one", i64(1)),
        init("zero_s", np.asarray(0, np.int64)), init("one_s", np.asarray(1, np.int64)),
        init("ax0", i64(0)), init("ax1", i64(1)), init("ax0_s", np.asarray(0, np.int64)),
        init("half", np.asarray(0.5, np.float32)), init("onef", np.asarray(1.0, np.float32)),
        init("sqrt2", np.asarray(math.sqrt(2.0), np.float32)),
    ]
    n = helper.make_node
    nodes = [
        # slots: which row of the grouped buffer each token-major assignment fills
        n("Gather", ["local_ids", "topk_idx"], ["local_idx"], axis=0),  # global -> position in this stack
        n("Reshape", ["local_idx", "minus_one"], ["flat"]),  # (A,)
        n("Unsqueeze", ["flat", "ax1"], ["flat_col"]),  # (A, 1)
        n("Equal", ["flat_col", "expert_ids"], ["hit"]),  # (A, E) bool
        n("Cast", ["hit"], ["onehot"], to=TensorProto.INT64),
        n("CumSum", ["onehot", "ax0_s"], ["running"]),  # (A, E)
        n("Mul", ["running", "onehot"], ["running_own"]),
        n("ReduceSum", ["running_own", "ax1"], ["rank1"], keepdims=0),  # (A,)
        n("Sub", ["rank1", "one"], ["rank"]),
        n("ReduceSum", ["onehot", "ax0"], ["counts"], keepdims=0),  # (E,)
        n("ReduceMax", ["counts"], ["C"], keepdims=1),  # (1,) the fullest expert
        n("Mul", ["flat", "C"], ["base_row"]),
        n("Add", ["base_row", "rank"], ["slot"]),  # (A,)
        # the token of each assignment: a // k
        n("Shape", ["local_idx"], ["idx_shape"]),
        n("Gather", ["idx_shape", "one_s"], ["k"], axis=0),  # scalar
        n("Size", ["flat"], ["A"]),  # scalar
        n("Range", ["zero_s", "A", "one_s"], ["assign"]),
        n("Div", ["assign", "k"], ["tok"]),  # (A,) integer division
        # scatter the tokens into (E*C, d), grouped by expert
        n("Mul", ["E", "C"], ["EC"]),
        n("Concat", ["EC", "d"], ["buf_shape"], axis=0),
        n("ConstantOfShape", ["buf_shape"], ["zeros"], value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
        n("Gather", ["token", "tok"], ["picked"], axis=0),  # (A, d)
        n("Unsqueeze", ["slot", "ax1"], ["slot_col"]),
        n("ScatterND", ["zeros", "slot_col", "picked"], ["buf"]),
        n("Concat", ["E", "C", "d"], ["grouped_shape"], axis=0),
        n("Reshape", ["buf", "grouped_shape"], ["grouped"]),  # (E, C, d)
        # every expert on its group: batched MatMul, exact GELU, batched MatMul
        n("MatMul", ["grouped", "w1"], ["h0"]),
        n("Add", ["h0", "b1"], ["h1"]),  # (E, C, h)
        n("Div", ["h1", "sqrt2"], ["h_scaled"]),
        n("Erf", ["h_scaled"], ["h_erf"]),
        n("Add", ["h_erf", "onef"], ["h_erf1"]),
        n("Mul", ["h1", "half"], ["h_half"]),
        n("Mul", ["h_half", "h_erf1"], ["h"]),
        n("MatMul", ["h", "w2"], ["y0"]),
        n("Add", ["y0", "b2"], ["y1"]),  # (E, C, d)
        n("Concat", ["minus_one", "d"], ["rows_shape"], axis=0),
        n("Reshape", ["y1", "rows_shape"], ["rows"]),  # (E*C, d)
        # back to the tokens: gate each assignment, sum a token's k assignments onto its residual
        n("Gather", ["rows", "slot"], ["y_assign"], axis=0),  # (A, d)
        n("Reshape", ["gates", "minus_one"], ["gate_flat"]),
        n("Unsqueeze", ["gate_flat", "ax1"], ["gate_col"]),
        n("Mul", ["y_assign", "gate_col"], ["y_gated"]),
        n("Unsqueeze", ["k", "ax0"], ["k1"]),
        n("Concat", ["minus_one", "k1", "d"], ["per_token_shape"], axis=0),
        n("Reshape", ["y_gated", "per_token_shape"], ["per_token"]),  # (N, k, d)
        n("ReduceSum", ["per_token", "ax1"], ["mixed"], keepdims=0),
        n("Add", ["token", "mixed"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "batched_experts",
        [
            helper.make_tensor_value_info("token", TensorProto.FLOAT, ["N", d]),
            helper.make_tensor_value_info("topk_idx", TensorProto.INT64, ["N", "k"]),
            helper.make_tensor_value_info("gates", TensorProto.FLOAT, ["N", "k"]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", d])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fedge")
    model.ir_version = min(model.ir_version, 10)  # readable by older onnxruntime releases too
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def batched_expert_groups(groups: dict[str, tuple[int, ...]]) -> dict[str | None, tuple[int, ...]]:
    """Modality (None: every modality) -> the experts of one batched shard.

    One shard for all experts when every modality may use all of them (``"shared"``), else one per modality
    holding its group (a device downloads only its modalities' groups; shared experts appear in each).
    """
    distinct = set(groups.values())
    if len(distinct) == 1:
        return {None: next(iter(distinct))}
    return {m: ids for m, ids in groups.items()}


def example_inputs(ids: Sequence[int], *, dim: int, top_k: int, batch: int, seed: int = 0) -> dict[str, Tensor]:
    """Inputs of a batched shard over experts ``ids``: each token picks ``top_k`` distinct experts of ``ids``."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.as_tensor(list(ids))
    idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:top_k]] for _ in range(batch)])
    gates = torch.rand(batch, top_k, generator=g)
    return {"token": torch.randn(batch, dim, generator=g), "topk_idx": idx, "gates": gates / gates.sum(1, True)}
