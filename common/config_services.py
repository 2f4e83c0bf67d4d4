"""Config sections of the services around a run: sharded model delivery to devices, publishing each new base,
and the live dashboard of a running aggregator."""

from __future__ import annotations

from dataclasses import dataclass

from fedge.common.config_check import check

__all__ = ["DashboardConfig", "PublishConfig", "ShardsConfig"]


@dataclass(frozen=True)
class ShardsConfig:
    """Sharded model delivery to a device (edge/shards.py): where the shard server is and what to trust.

    ``public_key`` is the pinned Ed25519 public key (PEM file) that every manifest must be signed with;
    ``ca_file`` pins the server's TLS CA (empty: system trust store); ``budget_mb`` bounds the on-disk cache.
    Per-device tokens are node secrets: they come from the command line or ``FEDGE_SHARD_TOKEN``, never here.
    ``allow_insecure_http`` lets a token go to a plain ``http://`` url (refused otherwise; trusted networks only).
    ``timeout_s`` bounds each request; ``retry_s`` is how long a device keeps retrying a cut or refused download
    (resuming where it stopped) before the round fails, long enough to ride out a shard server restart.
    """

    url: str = ""
    public_key: str = ""
    cache_dir: str = ""
    budget_mb: float = 64.0
    ca_file: str = ""
    timeout_s: float = 10.0
    retry_s: float = 30.0
    allow_insecure_http: bool = False

    def __post_init__(self) -> None:
        check(self.url == "" or self.url.startswith(("http://", "https://")), "shards.url",
               "must start with http:// or https://")
        check(self.budget_mb > 0, "shards.budget_mb", "must be > 0")
        check(self.timeout_s > 0, "shards.timeout_s", "must be > 0")
        check(self.retry_s >= 0, "shards.retry_s", "must be >= 0")


@dataclass(frozen=True)
class PublishConfig:
    """Where the cloud publishes every new base (cloud/publisher.py) and how devices get it.

    ``store``: the model store root the shard server serves ("" = ``<run_dir or training.storage_path>/models``
    when global training is on); ``signing_key``: the Ed25519 private key (PEM) that signs manifests ("" = a key
    generated inside the store, for simulations: devices that pin a key need the real one); ``onnx``: export
    the ONNX inference shards of each base too; ``deltas``: publish each changed training shard also as a
    compressed delta against the previous base (a device holding it downloads about a quarter of the bytes).
    Devices find the shard server in their own node config (``shards-url``), never here.
    """

    store: str = ""
    signing_key: str = ""
    onnx: bool = True
    deltas: bool = True


@dataclass(frozen=True)
class DashboardConfig:
    """The live view of a running aggregator (cloud/dashboard): web page, ``/api/state``, ``/metrics``, TensorBoard.

    ``address``: ``[HOST:]PORT`` the ServerApp serves the dashboard on ("" = off; a bare port means
    127.0.0.1). Beyond loopback a token is required: ``$FEDGE_DASHBOARD_TOKEN`` or any device/operator token
    of ``tokens_file`` (the shard server's tokens file); ``public`` serves without one. Tokens are secrets:
    they never go in the config. ``tensorboard``: write TensorBoard scalars per version into ``run_dir/tb``
    while the run goes on.
    """

    address: str = ""
    public: bool = False
    tokens_file: str = ""
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.address:
            _, _, port = self.address.rpartition(":")
            check(port.isdigit() and 0 <= int(port) <= 65535, "dashboard.address",
                   f"must be [HOST:]PORT with a port in 0..65535, got {self.address!r}")
