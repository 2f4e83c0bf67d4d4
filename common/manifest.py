"""The shard manifest: what a model version is made of, and the Ed25519 signature that makes it trustworthy.

A model version is exported as independent *shards* (one encoder per modality, the router, each expert, the
fusion + classifier head), each in two formats: ONNX for inference on devices and safetensors for training.
The manifest lists every shard file with its sha256 and size, and the model shape a runner needs.

Trust chain: the cloud signs the canonical JSON bytes of the manifest with its Ed25519 key; a device checks
that signature against a public key pinned in its own config *before* it trusts any hash in the manifest, then
refuses every shard whose sha256 differs. A hash alone only catches corruption; the signature stops a forged
model. The signed envelope on the wire is ``{"manifest": {...}, "signature": "<hex>", "key_id": "<hex>"}``.

Pure data and crypto: no network, no files except the key helpers at the bottom.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .config import MODALITIES
from .pki_files import SIGNING_KEY_STEM
from .shard_api import LATEST

__all__ = [
    "FORMATS",
    "KINDS",
    "MANIFEST_KEY",
    "SCHEMA",
    "Manifest",
    "ManifestError",
    "ShardFile",
    "SignatureError",
    "TensorSpec",
    "base_shards",
    "batched_experts_shard",
    "canonical_json",
    "device_experts",
    "expert_groups",
    "expert_shard",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "public_pem",
    "release_order",
    "sha256_bytes",
    "sha256_file",
    "sign_manifest",
    "verify_manifest",
]

SCHEMA = 1
MANIFEST_KEY = "manifest"  # the signed envelope's field that holds the manifest
# "experts": every expert of a group stacked in one ONNX graph (fedge.cloud.experts_onnx), an alternative to "expert"
KINDS: tuple[str, ...] = ("encoder", "router", "expert", "head", "experts")
FORMATS: dict[str, str] = {"onnx": "onnx", "safetensors": "safetensors", "delta": "delta"}  # format -> file extension


class ManifestError(ValueError):
    """A manifest is malformed (missing key, unknown kind, bad hash...)."""


class SignatureError(ManifestError):
    """A manifest's signature does not verify against the pinned public key."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one model input or output; ``None`` in a shape is a dynamic axis."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(d["shape"]))


@dataclass(frozen=True)
class ShardFile:
    """One file of one shard.

    ``name`` is the shard (``encoder.image``, ``router``, ``expert.2``, ``head``), ``file`` the name it is
    served and cached under (``<name>.<ext>``); ``modality`` is set for encoders and, with modality-affine experts
    (``model.expert_affinity = "modality"``), for each expert private to one modality's group (a shared expert
    has none).
    """

    name: str
    kind: str
    modality: str | None
    format: str
    file: str
    sha256: str
    bytes: int
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    opset: int | None = None
    expert: int | None = None
    delta_from: str | None = None  # format "delta": sha256 of the safetensors shard this delta applies to

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ManifestError(f"shard {self.name!r}: unknown kind {self.kind!r} (known: {KINDS})")
        if self.format not in FORMATS:
            raise ManifestError(f"shard {self.name!r}: unknown format {self.format!r} (known: {tuple(FORMATS)})")
        if self.modality is not None and self.modality not in MODALITIES:
            raise ManifestError(f"shard {self.name!r}: unknown modality {self.modality!r}")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ManifestError(f"shard file {self.file!r}: sha256 must be 64 lowercase hex digits")
        if self.bytes < 0:
            raise ManifestError(f"shard file {self.file!r}: bytes must be >= 0")
        if (self.format == "delta") != (self.delta_from is not None):
            raise ManifestError(f"shard file {self.file!r}: a delta (and only a delta) names the shard it applies to")
        if self.delta_from is not None and (len(self.delta_from) != 64
                                            or any(c not in "0123456789abcdef" for c in self.delta_from)):
            raise ManifestError(f"shard file {self.file!r}: delta_from must be 64 lowercase hex digits")
        if "/" in self.file or "\\" in self.file or self.file.startswith("."):
            raise ManifestError(f"shard file {self.file!r}: must be a plain file name")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [t.to_dict() for t in self.inputs]
        d["outputs"] = [t.to_dict() for t in self.outputs]
        if d["delta_from"] is None:  # the manifests of versions without deltas keep their exact bytes
            del d["delta_from"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardFile:
        try:
            return cls(
                name=str(d["name"]),
                kind=str(d["kind"]),
                modality=d.get("modality"),
                format=str(d["format"]),
                file=str(d["file"]),
                sha256=str(d["sha256"]),
                bytes=int(d["bytes"]),
                inputs=tuple(TensorSpec.from_dict(t) for t in d.get("inputs", ())),
                outputs=tuple(TensorSpec.from_dict(t) for t in d.get("outputs", ())),
                opset=d.get("opset"),
                expert=d.get("expert"),
                delta_from=d.get("delta_from"),
            )
        except KeyError as e:
            raise ManifestError(f"shard entry lacks key {e.args[0]!r}") from None


@dataclass(frozen=True)
class Manifest:
    """A model version: its shape (``model``: dim, num_experts, top_k, num_classes, image_size, n_mels,
    audio_frames, modalities, expert_affinity, shared_experts, expert_groups) and its shard files.

    ``expert_groups`` maps each modality to the experts its tokens may route to (all of them with the
    ``"shared"`` affinity); manifests written before the key existed mean ``"shared"``.

    ``serial`` is the publication number the model store assigns (1, 2, ... in publish order; 0 = unnumbered,
    written before serials existed). It is signed, so a device can refuse an older version replayed as current
    (:func:`release_order`)."""

    version: str
    model: Mapping[str, Any]
    files: tuple[ShardFile, ...]
    created: str = ""
    schema: int = SCHEMA
    extra: Mapping[str, Any] = field(default_factory=dict)
    serial: int = 0

    def __post_init__(self) -> None:
        if not self.version or "/" in self.version or self.version.startswith(".") or self.version == LATEST:
            raise ManifestError(f"manifest version {self.version!r}: must be a plain name other than {LATEST!r}")
        if self.serial < 0:
            raise ManifestError(f"manifest {self.version}: serial must be >= 0, got {self.serial}")
        seen: set[str] = set()
        for f in self.files:
            if f.file in seen:
                raise ManifestError(f"manifest lists file {f.file!r} twice")
            seen.add(f.file)

    # ------------------------------------------------------------------ queries
    def file(self, name: str, fmt: str = "onnx") -> ShardFile:
        """The ``fmt`` file of shard ``name``; :class:`KeyError` naming the shard when absent."""
        for f in self.files:
            if f.name == name and f.format == fmt:
                return f
        raise KeyError(f"manifest {self.version}: no {fmt} file for shard {name!r}")

    def by_file(self, file: str) -> ShardFile:
        """The entry whose served file name is ``file``."""
        for f in self.files:
            if f.file == file:
                return f
        raise KeyError(f"manifest {self.version}: no shard file {file!r}")

    def shards(self, fmt: str = "onnx") -> tuple[ShardFile, ...]:
        """Every file of format ``fmt``."""
        return tuple(f for f in self.files if f.format == fmt)

    def total_bytes(self, fmt: str = "onnx") -> int:
        """Size of the whole model in format ``fmt`` (each expert once: batched expert shards repeat them)."""
        return sum(f.bytes for f in self.shards(fmt) if f.kind != "experts")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "version": self.version,
            "created": self.created,
            "model": dict(self.model),
            "files": [f.to_dict() for f in self.files],
            "extra": dict(self.extra),
            "serial": self.serial,
        }

    def canonical_bytes(self) -> bytes:
        """The exact bytes that are signed: sorted keys, no whitespace, UTF-8."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        try:
            schema = int(d["schema"])
            if schema != SCHEMA:
                raise ManifestError(f"manifest schema {schema} is not supported (expected {SCHEMA})")
            return cls(
                version=str(d["version"]),
                model=dict(d["model"]),
                files=tuple(ShardFile.from_dict(f) for f in d["files"]),
                created=str(d.get("created", "")),
                schema=schema,
                extra=dict(d.get("extra", {})),
                serial=int(d.get("serial", 0)),
            )
        except KeyError as e:
            raise ManifestError(f"manifest lacks key {e.args[0]!r}") from None
        except ManifestError:
            raise
        except (TypeError, ValueError) as e:  # e.g. a serial that is not a number
            raise ManifestError(f"manifest has a malformed value: {e}") from None


def release_order(manifest: Manifest) -> tuple[int, str]:
    """Sort key of a version by publication: its signed serial, then its signed creation time.

    A device keeps the largest key it has accepted and refuses any manifest whose key is smaller (a rollback:
    an older signed version served as the one asked for or as ``latest``)."""
    return manifest.serial, manifest.created


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes (what signatures are computed over)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------- shard selection (pure)
def base_shards(manifest: Manifest, modalities: Iterable[str]) -> tuple[str, ...]:
    """Shards a device with ``modalities`` needs before any routing: its encoders, the router and the head.

    Experts are left out on purpose: a device fetches an expert only when its router first selects it.
    """
    mods = tuple(modalities)
    for m in mods:
        if m not in MODALITIES:
            raise ManifestError(f"unknown modality {m!r}; known: {MODALITIES}")
    # any format: a base published without ONNX inference shards still has its training shards
    names = list(dict.fromkeys(f.name for f in manifest.files if f.kind == "encoder" and f.modality in mods))
    missing = [m for m in mods if f"encoder.{m}" not in names]
    if missing:
        raise ManifestError(f"manifest {manifest.version} has no encoder for {missing}")
    return (*names, "router", "head")


def expert_shard(index: int) -> str:
    """Shard name of expert ``index``."""
    return f"expert.{index}"


def batched_experts_shard(modality: str | None) -> str:
    """Shard name of the batched experts of ``modality``'s group (None: all experts, the ``"shared"`` layout)."""
    return "experts" if modality is None else f"experts.{modality}"


def expert_groups(manifest: Manifest) -> dict[str, tuple[int, ...]]:
    """Modality -> the experts its tokens may route to, as recorded in the manifest's model shape.

    Manifests without ``expert_groups`` (the ``"shared"`` layout) let every modality use every expert.
    """
    n = int(manifest.model["num_experts"])
    recorded = manifest.model.get("expert_groups")
    if recorded is None:
        return {m: tuple(range(n)) for m in MODALITIES}
    groups: dict[str, tuple[int, ...]] = {}
    for m in MODALITIES:
        if m not in recorded:
            raise ManifestError(f"manifest {manifest.version}: expert_groups lacks modality {m!r}")
        ids = tuple(int(e) for e in recorded[m])
        if not ids or any(not 0 <= e < n for e in ids):
            raise ManifestError(f"manifest {manifest.version}: expert_groups[{m!r}] = {list(ids)} is not a "
                                f"non-empty subset of the {n} experts")
        groups[m] = ids
    return groups


def device_experts(manifest: Manifest, modalities: Iterable[str]) -> tuple[str, ...]:
    """Expert shards a device with ``modalities`` can ever route to (the union of its modalities' groups)."""
    groups = expert_groups(manifest)
    ids: set[int] = set()
    for m in modalities:
        if m not in groups:
            raise ManifestError(f"unknown modality {m!r}; known: {MODALITIES}")
        ids |= set(groups[m])
    return tuple(expert_shard(e) for e in sorted(ids))


# ---------------------------------------------------------------------- signing
def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw public key (tells keys apart in errors and logs)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_bytes(raw)[:16]


def sign_manifest(manifest: Manifest, private: Ed25519PrivateKey) -> bytes:
    """The signed envelope (JSON bytes) for ``manifest``."""
    sig = private.sign(manifest.canonical_bytes())
    env = {MANIFEST_KEY: manifest.to_dict(), "signature": sig.hex(), "key_id": key_id(private.public_key())}
    return json.dumps(env, sort_keys=True, indent=1).encode("utf-8")


def verify_manifest(envelope: bytes, public: Ed25519PublicKey) -> Manifest:
    """Parse a signed envelope and return its manifest only if the signature verifies against ``public``.

    Raises
    ------
    ManifestError
        The bytes are not a well-formed envelope.
    SignatureError
        The signature was not made by the pinned key (or the manifest was altered after signing).
    """
    try:
        env = json.loads(envelope)
        body, sig_hex = env[MANIFEST_KEY], env["signature"]
        sig = bytes.fromhex(sig_hex)
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"not a signed manifest envelope: {e}") from None
    try:
        public.verify(sig, canonical_json(body))
    except InvalidSignature:
        raise SignatureError(
            f"manifest signature does not verify against the pinned key {key_id(public)} "
            f"(signed by key {env.get('key_id', '?')})"
        ) from None
    return Manifest.from_dict(body)


def generate_keypair(directory: str | Path, *, name: str = SIGNING_KEY_STEM,
                     overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``<name>.key`` (PKCS8 PEM, mode 0600) and ``<name>.pub`` (SubjectPublicKeyInfo PEM) into
    ``directory`` and return their paths. Refuses to overwrite an existing key unless asked."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = d / f"{name}.key", d / f"{name}.pub"
    if not overwrite and (priv_path.exists() or pub_path.exists()):
        raise FileExistsError(f"key pair already exists in {d} ({priv_path.name}); pass overwrite to replace it")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    priv_path.write_bytes(b"")
    priv_path.chmod(0o600)
    priv_path.write_bytes(pem)
    pub_path.write_bytes(public_pem(private.public_key()))
    return priv_path, pub_path


def public_pem(public: Ed25519PublicKey) -> bytes:
    """PEM bytes of a public key."""
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key (PEM); a clear error for a missing file or another key type."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"signing key not found: {p}")
    key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ManifestError(f"{p}: not an Ed25519 private key")
    return key


def load_public_key(path_or_pem: str | Path | bytes) -> Ed25519PublicKey:
    """Read an Ed25519 public key from a PEM file path or PEM bytes."""
    if isinstance(path_or_pem, bytes):
        data = path_or_pem
    else:
        p = Path(path_or_pem)
        if not p.is_file():
            raise FileNotFoundError(f"public key not found: {p}")
        data = p.read_bytes()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise ManifestError(f"not a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ManifestError("pinned key is not an Ed25519 public key")
    return key
