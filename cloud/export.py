"""Export a model version as independent shards (ONNX for inference, safetensors for training) + a signed manifest.

The shards and what each computes are :mod:`fedge.cloud.sharding`, the ONNX export and its checks
:mod:`fedge.cloud.onnx_export` (both re-exported here). Together the shards reproduce
:meth:`fedge.common.model.MultimodalMoE.forward` in fp32 with unlimited expert capacity (capacity limits are a
training device; at inference every routed token is served). Every ONNX file is checked against its torch module
(max abs diff <= 1e-4) before it is written into the manifest.

With modality-affine experts (``expert_affinity="modality"``) the manifest's model shape records each modality's
expert group (``expert_groups``), each private expert's shard carries its group's modality, and the router shard
takes a third input ``allowed`` (N, E): the runner builds it from the manifest's groups and the token's
modality, and the graph masks the logits outside it to ``-inf`` before the softmax and top-k, exactly as
:meth:`MultimodalMoE.route` does. ``top_k`` in the manifest is the experts a token mixes (in dense mode: its
whole group).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedge.cloud.experts_onnx import BatchedExperts, batched_expert_groups, batched_experts_onnx
from fedge.cloud.experts_onnx import example_inputs as batched_inputs
from fedge.cloud.onnx_export import (
    OPSET,
    TOLERANCE,
    ExportError,
    export_onnx,
    onnx_agreement,
    onnx_input_names,
    onnx_specs,
    reweight_onnx,
)
from fedge.cloud.sharding import (
    EncoderShard,
    ExpertShard,
    GroupedRouterShard,
    HeadShard,
    RouterShard,
    example_inputs,
    model_shape,
    plain_model,
    shard_modules,
)
from fedge.common.base_delta import shard_bytes
from fedge.common.manifest import (
    Manifest,
    ShardFile,
    TensorSpec,
    batched_experts_shard,
    sha256_bytes,
    sign_manifest,
)
from fedge.common.model import MODALITIES, MultimodalMoE
from fedge.common.shard_api import MANIFEST_FILE

__all__ = [
    "OPSET",
    "TOLERANCE",
    "EncoderShard",
    "ExpertShard",
    "ExportError",
    "GroupedRouterShard",
    "HeadShard",
    "RouterShard",
    "build_from_manifest",
    "example_inputs",
    "export_onnx",
    "export_version",
    "load_state_from_shards",
    "model_shape",
    "onnx_agreement",
    "plain_model",
    "reweight_onnx",
    "shard_modules",
]


def export_version(
    model: MultimodalMoE,
    out_dir: str | Path,
    *,
    version: str,
    private_key: Any,
    image_size: int,
    audio_frames: int,
    opset: int = OPSET,
    tolerance: float = TOLERANCE,
    progress: Callable[[str], None] | None = None,
    serial: int = 0,
    onnx: bool = True,
    graphs: Mapping[str, bytes] | None = None,
    extra_files: Callable[[dict[str, dict[str, np.ndarray]]], list[tuple[ShardFile, bytes]]] | None = None,
) -> Manifest:
    """Export every shard of ``model`` (LoRA merged first) into ``out_dir`` and write the signed manifest.

    Parameters
    ----------
    model : the global model (plain or LoRA-wrapped; it is not modified).
    out_dir : directory to write ``<shard>.onnx``, ``<shard>.safetensors`` and ``manifest.json`` into.
    version : the model version name recorded in the manifest.
    private_key : an ``Ed25519PrivateKey`` that signs the manifest.
    image_size, audio_frames : input sizes of the encoders (recorded; used for the agreement check).
    serial : the publication number signed into the manifest (:meth:`ModelStore.next_serial`; 0 = none).
    onnx : write the ONNX inference shards too (False: training shards only, e.g. a base no device runs).
    graphs : shard name -> ONNX bytes of an earlier version of the same architecture; each is re-weighted with
        this model's values (seconds faster than tracing again) and traced afresh when it does not agree.
    extra_files : called with each shard's training tensors (name -> tensor name -> array); the files it
        returns (entry, bytes) are written and listed too (e.g. deltas against the previous base).

    Raises
    ------
    ExportError
        When an ONNX shard's outputs differ from torch by more than ``tolerance``.
    """
    plain = plain_model(model)
    shape = model_shape(plain, image_size=image_size, audio_frames=audio_frames)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[ShardFile] = []
    extra: dict[str, Any] = {"agreement": {}}
    graphs_by_kind: dict[str, bytes] = {}
    tensors: dict[str, dict[str, np.ndarray]] = {}
    for name, (module, kind, modality, state) in shard_modules(plain).items():
        if progress:
            progress(name)
        tensors[name] = {k: v.detach().cpu().numpy().copy() for k, v in state.items()}
        st_bytes = shard_bytes(tensors[name], name)
        expert = int(name.split(".")[1]) if kind == "expert" else None
        formats: list[tuple[str, bytes]] = [("safetensors", st_bytes)]
        inputs: tuple[TensorSpec, ...] = ()
        outputs: tuple[TensorSpec, ...] = ()
        if not onnx:
            _write_files(out, files, name, kind, modality, expert, formats, inputs, outputs, opset)
            continue
        args = example_inputs(name, shape, 3)
        names = onnx_input_names(name, args)

        def agreement(data: bytes, module: nn.Module = module, name: str = name, names: list[str] = names) -> float:
            return max(onnx_agreement(data, module, example_inputs(name, shape, b, seed=b), names) for b in (1, 5))

        # Experts share one architecture: re-weight the first expert's graph instead of tracing each again
        # (the dynamo exporter takes seconds per module); a fresh export whenever that does not agree.
        earlier = (graphs or {}).get(name) or graphs_by_kind.get(kind)
        reweighted = reweight_onnx(earlier, module) if earlier is not None else None
        onnx_bytes = reweighted if reweighted is not None else export_onnx(module, name, kind, args, opset=opset)
        diff = agreement(onnx_bytes)
        if reweighted is not None and not diff <= tolerance:
            onnx_bytes = export_onnx(module, name, kind, args, opset=opset)
            diff = agreement(onnx_bytes)
        if kind == "expert":
            graphs_by_kind.setdefault(kind, onnx_bytes)
        if not diff <= tolerance:
            raise ExportError(f"shard {name!r}: ONNX differs from torch by {diff:.3g} > {tolerance}")
        extra["agreement"][name] = diff
        inputs, outputs = onnx_specs(onnx_bytes)
        _write_files(out, files, name, kind, modality, expert, [("onnx", onnx_bytes), *formats], inputs, outputs,
                     opset)
    if onnx:
        _export_batched_experts(plain, out, files, extra["agreement"], tolerance=tolerance, opset=opset)
    for entry, data in (extra_files(tensors) if extra_files else []):
        (out / entry.file).write_bytes(data)
        files.append(entry)
    manifest = Manifest(
        version=version,
        model=shape,
        files=tuple(files),
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        extra=extra,
        serial=serial,
    )
    (out / MANIFEST_FILE).write_bytes(sign_manifest(manifest, private_key))
    return manifest


def _write_files(out: Path, files: list[ShardFile], name: str, kind: str, modality: str | None, expert: int | None,
                 formats: list[tuple[str, bytes]], inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...],
                 opset: int) -> None:
    """Write one shard's files into ``out`` and append their manifest entries to ``files``."""
    for fmt, data in formats:
        fname = f"{name}.{fmt}"
        (out / fname).write_bytes(data)
        files.append(ShardFile(name=name, kind=kind, modality=modality, format=fmt, file=fname,
                               sha256=sha256_bytes(data), bytes=len(data),
                               inputs=inputs if fmt == "onnx" else (), outputs=outputs if fmt == "onnx" else (),
                               opset=opset if fmt == "onnx" else None, expert=expert))


def _export_batched_experts(model: MultimodalMoE, out: Path, files: list[ShardFile], agreement: dict[str, float],
                            *, tolerance: float, opset: int) -> None:
    """Write the batched expert shard(s) (ONNX only: the per-expert safetensors already hold their weights)."""
    top_k = model.experts_per_token
    for modality, ids in batched_expert_groups(model.groups).items():
        name = batched_experts_shard(modality)
        experts = [model.experts[e] for e in ids]
        data = batched_experts_onnx(experts, ids, model.num_experts, opset=opset)
        twin = BatchedExperts(experts, ids, model.num_experts)
        diff = max(onnx_agreement(data, twin, batched_inputs(ids, dim=model.dim, top_k=top_k, batch=b, seed=b),
                                  ["token", "topk_idx", "gates"]) for b in (1, 5))
        if not diff <= tolerance:
            raise ExportError(f"shard {name!r}: ONNX differs from torch by {diff:.3g} > {tolerance}")
        agreement[name] = diff
        (out / f"{name}.onnx").write_bytes(data)
        inputs, outputs = onnx_specs(data)
        files.append(ShardFile(name=name, kind="experts", modality=modality, format="onnx", file=f"{name}.onnx",
                               sha256=sha256_bytes(data), bytes=len(data), inputs=inputs, outputs=outputs, opset=opset))


def load_state_from_shards(directory: str | Path, manifest: Manifest) -> dict[str, Tensor]:
    """Rebuild the full plain state dict of a :class:`MultimodalMoE` from a version's safetensors shards.

    Each file's sha256 is checked against the manifest first (the cloud trusts its own store no more than
    a device does).
    """
    from safetensors.torch import load as st_load

    from fedge.common.manifest import sha256_file

    d = Path(directory)
    state: dict[str, Tensor] = {}
    embeds: dict[str, Tensor] = {}
    for f in manifest.shards("safetensors"):
        path = d / f.file
        if sha256_file(path) != f.sha256:
            raise ExportError(f"{path}: sha256 differs from the manifest")
        for k, v in st_load(path.read_bytes()).items():
            if k.startswith("modality_embed."):
                embeds[k.split(".", 1)[1]] = v
            else:
                state[k] = v
    state["modality_embed"] = torch.stack([embeds[m] for m in MODALITIES])
    return state


def build_from_manifest(directory: str | Path, manifest: Manifest) -> MultimodalMoE:
    """A plain fp32 eval :class:`MultimodalMoE` with the weights of a published version."""
    s = manifest.model
    model = MultimodalMoE(
        dim=s["dim"],
        num_experts=s["num_experts"],
        top_k=s["top_k"],
        expert_hidden=s["expert_hidden"],
        num_classes=s["num_classes"],
        n_mels=s["n_mels"],
        expert_affinity=s.get("expert_affinity", "shared"),
        shared_experts=int(s.get("shared_experts", 0)),
    )
    model.load_state_dict(load_state_from_shards(directory, manifest), strict=True)
    return model.eval()
