"""ONNX for one shard: export with the dynamo exporter, the agreement of onnxruntime with torch, re-weighting an
earlier graph of the same architecture, and the input/output specs the manifest records."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedge.common.manifest import TensorSpec

__all__ = [
    "OPSET",
    "TOLERANCE",
    "ExportError",
    "export_onnx",
    "onnx_agreement",
    "onnx_input_names",
    "onnx_specs",
    "reweight_onnx",
]

OPSET = 18
TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """A shard could not be exported or its ONNX output disagrees with torch."""


_OUTPUT_NAMES = {
    "encoder": ["token"],
    "router": ["probs", "topk_idx", "gates"],
    "expert": ["out"],
    "head": ["logits", "fusion_weights"],
}
_ONNX_INPUT_NAMES = {"encoder.image": ["image"], "encoder.audio": ["audio"]}


def onnx_input_names(name: str, args: dict[str, Tensor]) -> list[str]:
    """The ONNX input names of shard ``name`` (the encoders' inputs are named after their modality)."""
    return _ONNX_INPUT_NAMES.get(name, list(args))


def export_onnx(module: nn.Module, name: str, kind: str, args: dict[str, Tensor], *, opset: int = OPSET) -> bytes:
    """Export one shard with the dynamo exporter, batch axis dynamic, weights inside the single file."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dyn = {k: {0: batch} for k in args}
    with tempfile.TemporaryDirectory(prefix="fedge-onnx-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        buf_path = os.path.join(tmp, f"{name}.onnx")
        try:
            torch.onnx.export(
                module,
                tuple(args.values()),
                buf_path,
                dynamo=True,
                input_names=onnx_input_names(name, args),
                output_names=_OUTPUT_NAMES[kind],
                dynamic_shapes=dyn,
                opset_version=opset,
                external_data=False,
                verbose=False,
            )
        except Exception as e:  # the exporter raises many types; name the shard
            raise ExportError(f"ONNX export of shard {name!r} failed: {type(e).__name__}: {e}") from e
        return Path(buf_path).read_bytes()


def onnx_agreement(onnx_bytes: bytes, module: nn.Module, args: dict[str, Tensor], input_names: list[str]) -> float:
    """Max abs difference between onnxruntime and torch on ``args`` (integer outputs compared exactly)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    feeds = {n: v.numpy() for n, v in zip(input_names, args.values())}
    got = sess.run(None, feeds)
    with torch.no_grad():
        want = module(*args.values())
    want = want if isinstance(want, tuple) else (want,)
    worst = 0.0
    for g_, w_ in zip(got, want):
        w_np = w_.numpy()
        if g_.shape != w_np.shape:
            return float("inf")
        if np.issubdtype(w_np.dtype, np.integer):
            if not np.array_equal(g_, w_np):
                return float("inf")
            continue
        worst = max(worst, float(np.max(np.abs(g_.astype(np.float64) - w_np.astype(np.float64)), initial=0.0)))
    return worst


def reweight_onnx(onnx_bytes: bytes, module: nn.Module) -> bytes | None:
    """``onnx_bytes`` with every initializer named like a parameter of ``module`` replaced by its value.

    Returns None when the graph's initializers do not cover the module's state exactly (another architecture).
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    state = {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}
    found = set()
    for init in model.graph.initializer:
        if init.name in state:
            value = state[init.name]
            if tuple(init.dims) != value.shape:
                return None
            init.CopyFrom(numpy_helper.from_array(value.astype(np.float32), init.name))
            found.add(init.name)
    if found != set(state):
        return None
    return bytes(model.SerializeToString())


def onnx_specs(onnx_bytes: bytes) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The specs (name, dtype, shape; ``None`` for a dynamic axis) of a graph's inputs and outputs."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)

    def spec(v: Any) -> TensorSpec:
        t = v.type.tensor_type
        dims = tuple(int(x.dim_value) if x.HasField("dim_value") else None for x in t.shape.dim)
        return TensorSpec(name=v.name, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, shape=dims)

    return tuple(spec(v) for v in model.graph.input), tuple(spec(v) for v in model.graph.output)
