"""Export a model version as independent shards (ONNX for inference, safetensors for training) + a signed manifest.

Shards and what each computes (B samples, M modalities, N = present tokens, d width, E experts, k top-k)::

    encoder.<m>   x_m (B, ...)                          -> token (B, d)   encoder + modality embedding
    router        token (N, d), quality (N,) [, allowed (N, E) bool] -> probs (N, E), topk_idx (N, k), gates (N, k)
    expert.<e>    token (N, d)                          -> out (N, d)     one FFN expert
    experts[.<m>] token (N, d), topk_idx (N, k), gates (N, k) -> out (N, d)   the MoE residual, every expert of
                  a group stacked and computed grouped by expert (ONNX only; :mod:`fedge.cloud.experts_onnx`)
    head          routed (B, M, d), quality (B, M), mask (B, M) -> logits (B, C), fusion_weights (B, M)

A runner chains them: ``routed = token + sum_k gates_k * expert_{idx_k}(token)`` (the MoE residual of
:meth:`fedge.common.model.MultimodalMoE.route`), and the head holds the quality-aware fusion gate. Together they
reproduce :meth:`MultimodalMoE.forward` in fp32 with unlimited expert capacity (capacity limits are a training
device; at inference every routed token is served). Every ONNX file is checked against its torch module
(max abs diff <= 1e-4) before it is written into the manifest.

With modality-affine experts (``expert_affinity="modality"``) the manifest's model shape records each modality's
expert group (``expert_groups``), each private expert's shard carries its group's modality, and the router shard
takes a third input ``allowed`` (N, E): the runner builds it from the manifest's groups and the token's
modality, and the graph masks the logits outside it to ``-inf`` before the softmax and top-k, exactly as
:meth:`MultimodalMoE.route` does. ``top_k`` in the manifest is the experts a token mixes (in dense mode: its
whole group).
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fedge.cloud.experts_onnx import BatchedExperts, batched_expert_groups, batched_experts_onnx
from fedge.cloud.experts_onnx import example_inputs as batched_inputs
from fedge.common.base_delta import shard_bytes
from fedge.common.lora import LoRALinear, base_state, merge_lora
from fedge.common.manifest import (
    Manifest,
    ShardFile,
    TensorSpec,
    batched_experts_shard,
    expert_shard,
    sha256_bytes,
    sign_manifest,
)
from fedge.common.model import MODALITIES, MultimodalMoE, fuse, top_k_gating
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

OPSET = 18
TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """A shard could not be exported or its ONNX output disagrees with torch."""


# ---------------------------------------------------------------------- shard modules
class EncoderShard(nn.Module):
    """Encoder of one modality plus its modality embedding: x -> token (B, d)."""

    def __init__(self, encoder: nn.Module, embed: Tensor) -> None:
        super().__init__()
        self.encoder = encoder
        self.embed = nn.Parameter(embed.detach().clone(), requires_grad=False)  # (d,)

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x) + self.embed


class RouterShard(nn.Module):
    """Quality-aware router with top-k gating: (N, d), (N,) -> probs (N, E), topk_idx (N, k), gates (N, k)."""

    def __init__(self, router: nn.Module, *, top_k: int) -> None:
        super().__init__()
        self.router, self.top_k = router, top_k

    def forward(self, token: Tensor, quality: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        probs, idx, gates = top_k_gating(self.router(token, quality), self.top_k)
        return probs, idx, gates


class GroupedRouterShard(RouterShard):
    """Router for modality-affine experts: the logits outside ``allowed`` (N, E) bool are masked to ``-inf``."""

    def forward(  # type: ignore[override]
        self, token: Tensor, quality: Tensor, allowed: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        probs, idx, gates = top_k_gating(self.router(token, quality), self.top_k, allowed)
        return probs, idx, gates


class ExpertShard(nn.Module):
    """One expert FFN: token (N, d) -> out (N, d)."""

    def __init__(self, expert: nn.Module) -> None:
        super().__init__()
        self.expert = expert

    def forward(self, token: Tensor) -> Tensor:
        return self.expert(token)


class HeadShard(nn.Module):
    """Quality-aware fusion, per-modality heads and their confidence pooling (:func:`fedge.common.fusion.fuse`)."""

    def __init__(self, fusion_gate: nn.Module, head: nn.Module, modality_heads: nn.ModuleDict) -> None:
        super().__init__()
        self.fusion_gate, self.head, self.modality_heads = fusion_gate, head, modality_heads

    def forward(self, routed: Tensor, quality: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        logits, w, _, _ = fuse(routed, quality, mask, fusion_gate=self.fusion_gate, head=self.head,
                               modality_heads=self.modality_heads)
        return logits, w


# ---------------------------------------------------------------------- model helpers
def model_shape(model: MultimodalMoE, *, image_size: int, audio_frames: int) -> dict[str, Any]:
    """The model's shape as recorded in the manifest (what a runner and a rebuild need)."""
    expert_fc1: Any = model.experts[0].fc1
    head_fc2: Any = model.head.fc2
    audio_conv: Any = model.encoders["audio"].conv[0]  # type: ignore[index]
    return {
        "dim": int(model.dim),
        "num_experts": int(model.num_experts),
        "top_k": int(model.experts_per_token),
        "expert_hidden": int(expert_fc1.out_features),
        "num_classes": int(head_fc2.out_features),
        "n_mels": int(audio_conv.in_channels),
        "image_size": int(image_size),
        "audio_frames": int(audio_frames),
        "modalities": list(MODALITIES),
        "expert_affinity": str(model.expert_affinity),
        "shared_experts": int(model.shared_experts),
        "expert_groups": {m: list(g) for m, g in model.groups.items()},
    }


def plain_model(model: MultimodalMoE) -> MultimodalMoE:
    """A plain fp32 eval copy of ``model`` with every LoRA adapter merged into its base weights.

    The input is left untouched. Shards of the copy have no LoRA factors, so a device needs no adapter code.
    """
    m = copy.deepcopy(model).float().eval()
    if not any(isinstance(mod, LoRALinear) for mod in m.modules()):
        m.precision = {k: "fp32" for k in m.precision}
        return m
    merge_lora(m)
    shape = model_shape(m, image_size=1, audio_frames=1)
    plain = MultimodalMoE(
        dim=shape["dim"],
        num_experts=shape["num_experts"],
        top_k=int(m.top_k),
        expert_hidden=shape["expert_hidden"],
        num_classes=shape["num_classes"],
        n_mels=shape["n_mels"],
        dense=m.dense,
        expert_affinity=m.expert_affinity,
        shared_experts=m.shared_experts,
    )
    plain.load_state_dict(base_state(m), strict=True)
    return plain.eval()


def shard_modules(model: MultimodalMoE) -> dict[str, tuple[nn.Module, str, str | None, dict[str, Tensor]]]:
    """Shard name -> (module, kind, modality, safetensors state under the model's own parameter names)."""
    model = model.eval()
    top_k = model.experts_per_token
    owner = {e: ms[0] for e, ms in _expert_modalities(model.groups).items() if len(ms) == 1}
    out: dict[str, tuple[nn.Module, str, str | None, dict[str, Tensor]]] = {}
    for j, m in enumerate(MODALITIES):
        enc = model.encoders[m]
        state = {f"encoders.{m}.{k}": v for k, v in enc.state_dict().items()}
        state[f"modality_embed.{m}"] = model.modality_embed[j]
        out[f"encoder.{m}"] = (EncoderShard(enc, model.modality_embed[j]), "encoder", m, state)
    router_cls = GroupedRouterShard if model.expert_affinity == "modality" else RouterShard
    out["router"] = (
        router_cls(model.router, top_k=top_k),
        "router",
        None,
        {f"router.{k}": v for k, v in model.router.state_dict().items()},
    )
    for e, expert in enumerate(model.experts):
        state = {f"experts.{e}.{k}": v for k, v in expert.state_dict().items()}
        out[expert_shard(e)] = (ExpertShard(expert), "expert", owner.get(e), state)
    head_state = {f"fusion_gate.{k}": v for k, v in model.fusion_gate.state_dict().items()}
    head_state |= {f"head.{k}": v for k, v in model.head.state_dict().items()}
    head_state |= {f"modality_heads.{k}": v for k, v in model.modality_heads.state_dict().items()}
    out["head"] = (HeadShard(model.fusion_gate, model.head, model.modality_heads), "head", None, head_state)
    return out


def _expert_modalities(groups: dict[str, tuple[int, ...]]) -> dict[int, list[str]]:
    """Expert -> the modalities whose group holds it."""
    out: dict[int, list[str]] = {}
    for m, ids in groups.items():
        for e in ids:
            out.setdefault(e, []).append(m)
    return out


def example_inputs(
    name: str, shape: dict[str, Any], batch: int, *, seed: int = 0
) -> dict[str, Tensor]:
    """Realistic example inputs (by forward argument name) for shard ``name`` with batch/token count ``batch``."""
    g = torch.Generator().manual_seed(seed)
    d, m = shape["dim"], len(MODALITIES)
    if name == "encoder.image":
        s = shape["image_size"]
        return {"x": torch.rand(batch, 3, s, s, generator=g)}
    if name == "encoder.audio":
        return {"x": torch.randn(batch, shape["n_mels"], shape["audio_frames"], generator=g) * 10 - 40}
    if name == "router":
        args = {"token": torch.randn(batch, d, generator=g), "quality": torch.rand(batch, generator=g)}
        if shape.get("expert_affinity", "shared") == "modality":
            groups = shape["expert_groups"]
            allowed = torch.zeros(len(MODALITIES), shape["num_experts"], dtype=torch.bool)
            for j, mod in enumerate(MODALITIES):
                allowed[j, list(groups[mod])] = True
            args["allowed"] = allowed[torch.randint(len(MODALITIES), (batch,), generator=g)]
        return args
    if name.startswith("expert."):
        return {"token": torch.randn(batch, d, generator=g)}
    if name == "head":
        mask = torch.rand(batch, m, generator=g) < 0.6
        mask[:, 0] |= ~mask.any(dim=1)  # every sample keeps one modality
        return {
            "routed": torch.randn(batch, m, d, generator=g),
            "quality": torch.rand(batch, m, generator=g),
            "mask": mask,
        }
    raise KeyError(f"unknown shard {name!r}")


_OUTPUT_NAMES = {
    "encoder": ["token"],
    "router": ["probs", "topk_idx", "gates"],
    "expert": ["out"],
    "head": ["logits", "fusion_weights"],
}
_ONNX_INPUT_NAMES = {"encoder.image": ["image"], "encoder.audio": ["audio"]}


def _onnx_input_names(name: str, args: dict[str, Tensor]) -> list[str]:
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
                input_names=_onnx_input_names(name, args),
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


def _specs(onnx_bytes: bytes) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    import onnx

    model = onnx.load_from_string(onnx_bytes)

    def spec(v: Any) -> TensorSpec:
        t = v.type.tensor_type
        dims = tuple(int(x.dim_value) if x.HasField("dim_value") else None for x in t.shape.dim)
        return TensorSpec(name=v.name, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, shape=dims)

    return tuple(spec(v) for v in model.graph.input), tuple(spec(v) for v in model.graph.output)


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
        names = _onnx_input_names(name, args)

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
        inputs, outputs = _specs(onnx_bytes)
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
        inputs, outputs = _specs(data)
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
