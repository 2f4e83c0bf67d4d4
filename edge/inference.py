"""ShardedRunner: the model on a device as a chain of onnxruntime sessions, loaded shard by shard on demand.

For a batch of B samples (M modalities, N present tokens, width d)::

    encoder.<m> per present modality -> tokens (B, M, d), mask (B, M)
    router(tokens[mask], quality[mask]) -> top-k experts and gates per token
    expert.<e> for each expert some token chose (downloaded the first time) -> routed tokens
        or, with ``batched_experts``, the batched expert shard(s): every expert of a group in one call
    head(routed (B, M, d), quality, mask) -> logits (B, C)

With modality-affine experts the glue also gives the router ``allowed`` (N, E): row n is the expert group
(from the signed manifest's ``expert_groups``) of token n's modality, and the router graph masks the logits
outside it to ``-inf`` before the softmax and top-k, as :meth:`fedge.common.model.MultimodalMoE.route` does, so a
token never reaches (and the device never downloads) another modality's experts.

It reproduces :meth:`fedge.common.model.MultimodalMoE.forward` (fp32, unlimited capacity) to ~1e-6.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from fedge.common.config import MODALITIES
from fedge.common.manifest import Manifest, ManifestError, ShardFile, batched_experts_shard, expert_groups

from .shards import ShardCache

__all__ = [
    "Backend",
    "Prediction",
    "Session",
    "ShardedRunner",
    "combine_experts",
    "group_mask",
    "onnxruntime_backend",
]


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
        sel = idx[tok] == e  # (n_e, k): a token picks an expert at most once, so one True per row
        g = (gates[tok] * sel).sum(axis=1, dtype=np.float32)  # (n_e,)
        out[tok] += g[:, None] * outputs[e]  # rows of tok are distinct: plain fancy-index add is exact
    return out


def group_mask(manifest: Manifest) -> np.ndarray:
    """(M, E) bool: True where modality m's tokens may use expert e (the manifest's ``expert_groups``)."""
    groups = expert_groups(manifest)
    allowed = np.zeros((len(MODALITIES), int(manifest.model["num_experts"])), bool)
    for j, m in enumerate(MODALITIES):
        allowed[j, list(groups[m])] = True
    return allowed


class Session(Protocol):
    """What the runner needs from a runtime: onnxruntime's ``InferenceSession.run`` signature."""

    def run(self, output_names: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


Backend = Callable[[ShardFile, Path], Session]


def onnxruntime_backend(*, threads: int = 1) -> Backend:
    """Open shards as onnxruntime CPU sessions (all graph optimisations, ``threads`` intra-op threads)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

    def open_session(entry: ShardFile, path: Path) -> Session:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])  # type: ignore[no-any-return]

    return open_session


class ShardedRunner:
    """Run a model version from a :class:`ShardCache`, one runtime session per shard, opened on first use.

    Parameters
    ----------
    cache : the device's shard cache (decides which shards exist locally).
    threads : onnxruntime intra-op threads per session.
    backend : how a shard file becomes a session (default: onnxruntime); benchmarks plug torch in here.
    batched_experts : run the routed experts with the version's batched expert shards (``experts``, or
        ``experts.<m>`` per modality group with modality-affine experts): one session call computes every
        chosen expert, grouped by expert (:mod:`fedge.cloud.experts_onnx`), instead of one call per expert. Such a
        shard holds its whole group, so the first routing downloads all of the group's experts at once.
        Versions published without them run expert by expert.
    """

    def __init__(self, cache: ShardCache, *, threads: int = 1, backend: Backend | None = None,
                 batched_experts: bool = False) -> None:
        self.cache = cache
        self.batched_experts = batched_experts
        self._open = backend or onnxruntime_backend(threads=threads)
        self._sessions: dict[str, Session] = {}  # sha256 -> session
        self._by_name: dict[str, Session] = {}
        self._set(cache.manifest())

    def _set(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._entries = {f.name: f for f in manifest.shards()}
        self._by_name = {}
        self._dim, self._nm = int(manifest.model["dim"]), len(MODALITIES)
        self._allowed: np.ndarray | None = None
        if manifest.model.get("expert_affinity", "shared") == "modality":
            router = self._entries.get("router")
            if router is None or not any(t.name == "allowed" for t in router.inputs):
                raise ManifestError(f"manifest {manifest.version}: modality-affine experts but the router shard "
                                    "has no 'allowed' input")
            self._allowed = group_mask(manifest)

    def refresh(self) -> str:
        """Follow the server's latest version (keeping sessions of shards that did not change)."""
        self._set(self.cache.manifest(refresh=True))
        live = {f.sha256 for f in self.manifest.shards()}
        self._sessions = {k: v for k, v in self._sessions.items() if k in live}
        return self.manifest.version

    def _session(self, name: str) -> Session:
        sess = self._by_name.get(name)
        if sess is None:
            entry = self._entries.get(name)
            if entry is None:
                raise KeyError(f"manifest {self.manifest.version}: no onnx file for shard {name!r}")
            sess = self._sessions.get(entry.sha256)
            if sess is None:
                sess = self._open(entry, self.cache.path(name))
                self._sessions[entry.sha256] = sess
            self._by_name[name] = sess
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
        given = {"image": image, "audio": audio}
        present = [m for m in MODALITIES if given[m] is not None]
        if not present:
            raise ValueError("predict needs at least one of image, audio")
        arrays: dict[str, np.ndarray] = {}
        b = -1
        for m in present:
            if m not in self.cache.modalities:
                raise ValueError(f"this device has no {m} modality (modalities: {self.cache.modalities})")
            a = np.asarray(given[m], dtype=np.float32)
            want = self._entries[f"encoder.{m}"].inputs[0].shape
            if a.ndim != len(want) or any(w is not None and w != s for w, s in zip(want[1:], a.shape[1:])):
                raise ValueError(f"{m} input has shape {a.shape}; the model wants {tuple(want)} (None = batch)")
            if b >= 0 and a.shape[0] != b:
                raise ValueError(f"{m} has {a.shape[0]} samples, {present[0]} has {b}")
            if not np.isfinite(a).all():
                raise ValueError(f"{m} input has non-finite values")
            b = a.shape[0]
            arrays[m] = np.ascontiguousarray(a)
        nm, d = self._nm, self._dim
        q = np.ones((b, nm), np.float32) if quality is None else np.asarray(quality, np.float32)
        if q.shape != (b, nm):
            raise ValueError(f"quality has shape {q.shape}, expected {(b, nm)}")

        mask = np.zeros((b, nm), bool)
        cols = []
        for j, m in enumerate(MODALITIES):
            if m in arrays:
                mask[:, j] = True
                cols.append(j)
        # present tokens in (sample, modality) order, as the torch model flattens them
        tokens = np.empty((b, len(cols), d), np.float32)
        for c, j in enumerate(cols):
            m = MODALITIES[j]
            tokens[:, c] = self._session(f"encoder.{m}").run(None, {m: arrays[m]})[0]
        x = tokens.reshape(-1, d)  # (N, d)
        qx = np.ascontiguousarray(q[:, cols]).reshape(-1)
        feeds = {"token": x, "quality": qx}
        if self._allowed is not None:  # modality-affine experts: each token keeps to its modality's group
            feeds["allowed"] = np.ascontiguousarray(self._allowed[np.tile(np.asarray(cols), b)])
        _, idx, gates = self._session("router").run(None, feeds)
        y = self._run_batched(x, idx, gates, cols) if self.batched_experts else None
        if y is None:
            outputs, rows = {}, {}
            for e in sorted(set(idx.ravel().tolist())):
                tok = np.flatnonzero((idx == e).any(axis=1))
                outputs[e] = self._session(f"expert.{e}").run(None, {"token": x[tok]})[0]
                rows[e] = tok
            y = combine_experts(x, idx, gates, outputs, rows)
        routed = np.zeros((b, nm, d), np.float32)
        routed[:, cols] = y.reshape(b, len(cols), d)
        logits, w = self._session("head").run(None, {"routed": routed, "quality": q, "mask": mask})
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = z / z.sum(axis=1, keepdims=True)
        per_sample = idx.reshape(b, -1)
        experts = [sorted(set(r)) for r in per_sample.tolist()]
        return Prediction(
            version=self.manifest.version,
            logits=logits,
            probs=probs,
            predictions=logits.argmax(axis=1),
            fusion_weights=w,
            experts=experts,
        )

    def _run_batched(self, x: np.ndarray, idx: np.ndarray, gates: np.ndarray, cols: list[int]) -> np.ndarray | None:
        """The MoE residual (N, d) from the batched expert shard(s), one call each; None when the version has none."""
        whole = batched_experts_shard(None)
        if whole in self._entries:
            return self._session(whole).run(None, {"token": x, "topk_idx": idx, "gates": gates})[0]
        names = [batched_experts_shard(MODALITIES[j]) for j in cols]
        if not all(n in self._entries for n in names):
            return None
        y = np.empty_like(x)
        for c, name in enumerate(names):  # tokens are sample-major: modality column c is every len(cols)-th row
            rows = slice(c, None, len(cols))
            feeds = {"token": x[rows], "topk_idx": idx[rows], "gates": gates[rows]}
            y[rows] = self._session(name).run(None, {k: np.ascontiguousarray(v) for k, v in feeds.items()})[0]
        return y
