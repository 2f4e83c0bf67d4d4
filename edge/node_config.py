"""The node scope of fedge's config: what one device is (id, store, modalities, profile), from Flower's node config.

A SuperNode gets it from ``flower-supernode --node-config "k=v ..."`` (``fedge edge run`` writes it); the
simulation engine sets ``partition-id`` and ``num-partitions``. Keys (all optional)::

    device-id       a stable name of the device (default: "partition-<id>" or "device")
    store           the device's SampleStore directory (deployment)
    state-dir       where the node keeps adapter / error-feedback / privacy state (default: <store>/agent-state)
    modalities      comma-separated subset of image,audio the device has (a mic-only device: "audio")
    profile         "auto" | "cpu" | "gpu": where local training runs
    threads         torch CPU threads for local training
    partition-id    simulation: which partition this virtual device trains on
    num-partitions  simulation: how many partitions there are
    shards-url      the shard server (https://host:port) the device fetches published bases from
    shards-public-key  the pinned Ed25519 public key (PEM file) every manifest must be signed with
    shards-ca       CA (PEM) of the shard server's TLS certificate (default: the system store)
    shards-cache    the device's shard cache folder (default: <state-dir>/shards)
    shards-budget-mb  the cache's byte budget in MiB (default 256)

The device's download token is a secret: it comes from ``FEDGE_SHARD_TOKEN``, never from a config.

Unknown keys and bad values raise :class:`fedge.common.config.ConfigError` naming the key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedge.common.config import MODALITIES, PRECISIONS, ConfigError

__all__ = ["KEYS", "PROFILES", "NodeConfig", "parse_node_config", "resolve_device", "resolve_precision"]

PROFILES = ("auto", "cpu", "gpu")
KEYS = ("device-id", "store", "state-dir", "modalities", "profile", "threads", "partition-id", "num-partitions",
        "shards-url", "shards-public-key", "shards-ca", "shards-cache", "shards-budget-mb")


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"node config key '{key}': {msg}")


@dataclass(frozen=True)
class NodeConfig:
    """One device's identity and capabilities."""

    device_id: str = ""
    store: str = ""
    state_dir: str = ""
    modalities: tuple[str, ...] = MODALITIES
    profile: str = "auto"
    threads: int = 1
    partition_id: int = 0
    num_partitions: int = 1
    shards_url: str = ""
    shards_public_key: str = ""
    shards_ca: str = ""
    shards_cache: str = ""
    shards_budget_mb: float = 256.0

    def __post_init__(self) -> None:
        if self.shards_url and not self.shards_url.startswith(("http://", "https://")):
            _fail("shards-url", f"must start with https:// (or http://), got {self.shards_url!r}")
        if self.shards_url and not self.shards_public_key:
            _fail("shards-public-key", "is needed with shards-url: manifests are checked against a pinned key")
        if self.shards_budget_mb <= 0:
            _fail("shards-budget-mb", "must be > 0")
        if not self.modalities:
            _fail("modalities", "must name at least one modality")
        for m in self.modalities:
            if m not in MODALITIES:
                _fail("modalities", f"unknown modality {m!r}; known: {MODALITIES}")
        if self.profile not in PROFILES:
            _fail("profile", f"must be one of {PROFILES}, got {self.profile!r}")
        if self.threads < 1:
            _fail("threads", "must be >= 1")
        if self.num_partitions < 1:
            _fail("num-partitions", "must be >= 1")
        if not 0 <= self.partition_id < self.num_partitions:
            _fail("partition-id", f"must be in [0, num-partitions={self.num_partitions})")

    @property
    def name(self) -> str:
        """The device's name for logs and state files."""
        return self.device_id or (f"partition-{self.partition_id}" if not self.store else "device")

    @property
    def state_path(self) -> Path | None:
        """Directory for the node's persistent state, or None when it has nowhere to keep it (simulation)."""
        if self.state_dir:
            return Path(self.state_dir)
        if self.store:
            return Path(self.store) / "agent-state"
        return None

    def to_flower(self) -> str:
        """The ``--node-config`` string for ``flower-supernode`` (values quoted, as Flower's parser wants)."""
        items = {
            "device-id": self.device_id, "store": self.store, "state-dir": self.state_dir,
            "modalities": ",".join(self.modalities), "profile": self.profile, "threads": self.threads,
            "shards-url": self.shards_url, "shards-public-key": self.shards_public_key, "shards-ca": self.shards_ca,
            "shards-cache": self.shards_cache,
        }
        out = []
        for k, v in items.items():
            if v == "":
                continue
            if isinstance(v, str):
                if '"' in v:
                    _fail(k, "must not contain a double quote")
                out.append(f'{k}="{v}"')
            else:
                out.append(f"{k}={v}")
        return " ".join(out)


def _int(key: str, v: Any) -> int:
    if isinstance(v, bool):
        _fail(key, f"expected an integer, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        _fail(key, f"expected an integer, got {v!r}")
    if not f.is_integer():
        _fail(key, f"expected an integer, got {v!r}")
    return int(f)


def parse_node_config(raw: Mapping[str, Any]) -> NodeConfig:
    """Flower's ``context.node_config`` -> :class:`NodeConfig`; raises ConfigError naming a bad key."""
    for k in raw:
        if k not in KEYS:
            _fail(k, f"unknown key (known: {', '.join(KEYS)})")
    mods = raw.get("modalities", ",".join(MODALITIES))
    if not isinstance(mods, str):
        _fail("modalities", f"expected a comma-separated string, got {mods!r}")
    return NodeConfig(
        device_id=str(raw.get("device-id", "")),
        store=str(raw.get("store", "")),
        state_dir=str(raw.get("state-dir", "")),
        modalities=tuple(dict.fromkeys(s.strip() for s in mods.split(",") if s.strip())),
        profile=str(raw.get("profile", "auto")),
        threads=_int("threads", raw.get("threads", 1)),
        partition_id=_int("partition-id", raw.get("partition-id", 0)),
        num_partitions=_int("num-partitions", raw.get("num-partitions", 1)),
        shards_url=str(raw.get("shards-url", "")),
        shards_public_key=str(raw.get("shards-public-key", "")),
        shards_ca=str(raw.get("shards-ca", "")),
        shards_cache=str(raw.get("shards-cache", "")),
        shards_budget_mb=_float("shards-budget-mb", raw.get("shards-budget-mb", 256.0)),
    )


def _float(key: str, v: Any) -> float:
    if isinstance(v, bool):
        _fail(key, f"expected a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        _fail(key, f"expected a number, got {v!r}")
    raise AssertionError  # unreachable: _fail raises


def resolve_device(profile: str, *, cuda_available: bool) -> str:
    """The torch device type local training uses: 'cuda' for profile gpu/auto when one is there, else 'cpu'.

    Raises ConfigError when the profile demands a GPU the device does not have.
    """
    if profile == "gpu" and not cuda_available:
        _fail("profile", "is 'gpu' but no CUDA device is available")
    return "cuda" if profile in ("gpu", "auto") and cuda_available else "cpu"


def resolve_precision(requested: Mapping[str, str], device_type: str, *, bf16_ok: bool = True
                      ) -> dict[str, str]:
    """Per-modality autocast precision this device can run.

    On a CPU, reduced precision means bf16 (CPU autocast's native type): fp16 becomes bf16. On a GPU, fp16
    and bf16 are kept, except bf16 on a GPU without bf16 support becomes fp16. fp32 stays fp32.
    """
    out: dict[str, str] = {}
    for m in MODALITIES:
        p = requested.get(m, "fp32")
        if p not in PRECISIONS:
            raise ConfigError(f"config key 'precision.{m}': must be one of {PRECISIONS}")
        if device_type == "cpu" and p == "fp16":
            p = "bf16"
        elif device_type == "cuda" and p == "bf16" and not bf16_ok:
            p = "fp16"
        out[m] = p
    return out
