"""ShardedRunner: the model on a device as a chain of onnxruntime sessions, loaded shard by shard on demand.

For a batch of B samples (M modalities, N present tokens, width d)::

    encoder.<m> per present modality -> tokens (B, M, d), mask (B, M)
    router(tokens[mask], quality[mask]) -> top-k experts and gates per token
    expert.<e> for each expert some token chose (downloaded the first time) -> routed tokens
    head(routed (B, M, d), quality, mask) -> logits (B, C)

It reproduces :meth:`common.model.MultimodalMoE.forward` (fp32, unlimited capacity) to ~1e-6.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.config import MODALITIES

from .shards import ShardCache


@dataclass
class Prediction:
    """One batch's result."""

    version: str
    logits: np.ndarray  # (B, C)
    probs: np.ndarray  # (B, C)
    predictions: np.ndarray  # (B,)
    fusion_weights: np.ndarray  # (B, M)
    experts: list[list[int]] = field(default_factory=list)  # per sample: experts its tokens used


def combine_experts(
    x: np.ndarray, idx: np.ndarray, gates: np.ndarray, outputs: dict[int, np.ndarray], rows: dict[int, np.ndarray]
) -> np.ndarray:
    """The MoE residual: ``x + sum_k gates[:, k] * expert_{idx[:, k]}(x)``.

    Parameters
    ----------
    x : (N, d) tokens.
    idx, gates : (N, k) chosen experts and their gates.
    outputs : expert e -> (n_e, d) its outputs for the tokens ``rows[e]`` (n_e,) routed to it.
    """
    out = x.astype(np.float32, copy=True)
    for e in sorted(outputs):
        tok = rows[e]
        g = (gates * (idx == e)).sum(axis=1)[tok]  # (n_e,) a token picks an expert at most once
        np.add.at(out, tok, g[:, None] * outputs[e])
    return out


class ShardedRunner:
    """Run a model version from a :class:`ShardCache` with one onnxruntime session per shard.

    Parameters
    ----------
    cache : the device's shard cache (decides which shards exist locally).
    threads : onnxruntime intra-op threads per session.
    """

    def __init__(self, cache: ShardCache, *, threads: int = 1) -> None:
        import onnxruntime as ort

        self.cache = cache
        self._ort = ort
        self._opts = ort.SessionOptions()
        self._opts.intra_op_num_threads = threads
        self._opts.inter_op_num_threads = 1
        self._opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._sessions: dict[str, Any] = {}  # sha256 -> session
        self.manifest = cache.manifest()

    def refresh(self) -> str:
        """Follow the server's latest version (keeping sessions of shards that did not change)."""
        self.manifest = self.cache.manifest(refresh=True)
        live = {f.sha256 for f in self.manifest.shards()}
        self._sessions = {k: v for k, v in self._sessions.items() if k in live}
        return self.manifest.version

    def load_base(self) -> None:
        """Download (if needed) and open the device's encoders, router and head."""
        for name in self.cache.required():
            self._session(name)

    def _session(self, name: str) -> Any:
        entry = self.manifest.file(name)
        sess = self._sessions.get(entry.sha256)
        if sess is None:
            path = self.cache.path(name)
            sess = self._ort.InferenceSession(str(path), self._opts, providers=["CPUExecutionProvider"])
            self._sessions[entry.sha256] = sess
        return sess

    def predict(
        self,
        *,
        image: np.ndarray | None = None,
        audio: np.ndarray | None = None,
        quality: np.ndarray | None = None,
    ) -> Prediction:
        """Classify a batch: ``image`` (B, 3, S, S) in [0, 1], ``audio`` (B, n_mels, T) log-mel dB, any subset.

        ``quality`` (B, M) in [0, 1] per modality (1 when omitted). Every sample has all the given modalities.
        """
        spec = self.manifest.model
        given = {"image": image, "audio": audio}
        present = [m for m in MODALITIES if given[m] is not None]
        if not present:
            raise ValueError("predict needs at least one of image, audio")
        for m in present:
            if m not in self.cache.modalities:
                raise ValueError(f"this device has no {m} modality (modalities: {self.cache.modalities})")
        b = int(np.asarray(given[present[0]]).shape[0])
        arrays: dict[str, np.ndarray] = {}
        for m in present:
            a = np.ascontiguousarray(np.asarray(given[m], dtype=np.float32))
            want = self.manifest.file(f"encoder.{m}").inputs[0].shape
            if a.ndim != len(want) or any(w is not None and w != s for w, s in zip(want[1:], a.shape[1:])):
                raise ValueError(f"{m} input has shape {a.shape}; the model wants {tuple(want)} (None = batch)")
            if a.shape[0] != b:
                raise ValueError(f"{m} has {a.shape[0]} samples, {present[0]} has {b}")
            if not np.isfinite(a).all():
                raise ValueError(f"{m} input has non-finite values")
            arrays[m] = a
        nm, d = len(MODALITIES), int(spec["dim"])
        q = np.ones((b, nm), np.float32) if quality is None else np.asarray(quality, np.float32)
        if q.shape != (b, nm):
            raise ValueError(f"quality has shape {q.shape}, expected {(b, nm)}")

        tokens = np.zeros((b, nm, d), np.float32)
        mask = np.zeros((b, nm), bool)
        for j, m in enumerate(MODALITIES):
            if m in arrays:
                (tokens[:, j],) = self._session(f"encoder.{m}").run(None, {m: arrays[m]})
                mask[:, j] = True
        flat = mask.reshape(-1)
        x = tokens.reshape(-1, d)[flat]  # (N, d)
        qx = q.reshape(-1)[flat]
        _, idx, gates = self._session("router").run(None, {"token": x, "quality": qx})
        outputs, rows = {}, {}
        for e in np.unique(idx).tolist():
            tok = np.nonzero((idx == e).any(axis=1))[0]
            (outputs[e],) = self._session(f"expert.{e}").run(None, {"token": x[tok]})
            rows[e] = tok
        y = combine_experts(x, idx, gates, outputs, rows)
        routed = np.zeros((b * nm, d), np.float32)
        routed[flat] = y
        logits, w = self._session("head").run(
            None, {"routed": routed.reshape(b, nm, d), "quality": q, "mask": mask}
        )
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        sample_of = np.nonzero(flat)[0] // nm
        experts = [sorted(set(idx[sample_of == i].reshape(-1).tolist())) for i in range(b)]
        return Prediction(
            version=self.manifest.version,
            logits=logits,
            probs=probs,
            predictions=logits.argmax(axis=1),
            fusion_weights=w,
            experts=experts,
        )
