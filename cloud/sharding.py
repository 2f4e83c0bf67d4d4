"""How a model is cut into shards: the torch module of each shard, the model's shape recorded in the manifest, the
plain (LoRA-merged) copy that is exported, and example inputs of each shard.

Shards and what each computes (B samples, M modalities, N = present tokens, d width, E experts, k top-k)::

    encoder.<m>   x_m (B, ...)                          -> token (B, d)   encoder + modality embedding
    router        token (N, d), quality (N,) [, allowed (N, E) bool] -> probs (N, E), topk_idx (N, k), gates (N, k)
    expert.<e>    token (N, d)                          -> out (N, d)     one FFN expert
    experts[.<m>] token (N, d), topk_idx (N, k), gates (N, k) -> out (N, d)   the MoE residual, every expert of
                  a group stacked and computed grouped by expert (ONNX only; :mod:`fedge.cloud.experts_onnx`)
    head          routed (B, M, d), quality (B, M), mask (B, M) -> logits (B, C), fusion_weights (B, M)

A runner chains them: ``routed = token + sum_k gates_k * expert_{idx_k}(token)`` (the MoE residual of
:meth:`fedge.common.model.MultimodalMoE.route`), and the head holds the quality-aware fusion gate.
:mod:`fedge.cloud.export` writes them as files.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from fedge.common.lora import LoRALinear, base_state, merge_lora
from fedge.common.manifest import expert_shard
from fedge.common.model import MODALITIES, MultimodalMoE, fuse, top_k_gating

__all__ = [
    "EncoderShard",
    "ExpertShard",
    "GroupedRouterShard",
    "HeadShard",
    "RouterShard",
    "example_inputs",
    "model_shape",
    "plain_model",
    "shard_modules",
]


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
