"""``fedge cloud keys | token | publish | serve``: sign, publish and serve sharded model versions."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer

from fedge.common.manifest import generate_keypair, load_private_key, load_public_key
from fedge.common.shard_api import MODELS_ROUTE

__all__ = ["keys_command", "publish_command", "serve_command", "token_command"]


def keys_command(
    out: Annotated[Path, typer.Option("--out", help="Folder for manifest.key (private) and manifest.pub.")] = Path(
        "keys"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing key pair (devices pinned to it then refuse "
                                            "every new manifest).")] = False,
) -> None:
    """Generate the Ed25519 key pair that signs manifests; pin manifest.pub in every device's config."""
    try:
        priv, pub = generate_keypair(out, overwrite=overwrite)
    except FileExistsError as e:
        typer.echo(f"fedge cloud keys: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"private key (keep on the cloud): {priv}\npublic key (shards.public_key on devices): {pub}")


def token_command(
    device: Annotated[str, typer.Argument(help="Device id the token is for (sent as X-Fedge-Device).")],
    tokens_file: Annotated[Path, typer.Option("--tokens", help="Tokens file the server reads.")] = Path(
        "keys/tokens.json"),
) -> None:
    """Create (or replace) a device's download token; prints it once (only its sha256 is stored)."""
    from fedge.cloud.serving import add_device_token

    try:
        tokens_file.parent.mkdir(parents=True, exist_ok=True)
        token = add_device_token(tokens_file, device)
    except ValueError as e:
        typer.echo(f"fedge cloud token: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(token)


def publish_command(
    version: Annotated[str, typer.Option(help="Name of the new version (immutable once published).")],
    store: Annotated[Path, typer.Option(help="ModelStore root directory.")] = Path("runs/models"),
    key: Annotated[Path, typer.Option(help="Ed25519 private key that signs the manifest.")] = Path(
        "keys/manifest.key"),
    checkpoint: Annotated[Path | None, typer.Option(
        help="safetensors file of the plain base state dict; default: the seeded initial model.")] = None,
    config: Annotated[Path | None, typer.Option(help="Run config TOML (model shape, seed).")] = None,
    onnx: Annotated[bool, typer.Option(help="Export the ONNX inference shards too (--no-onnx: training shards "
                                            "only).")] = True,
) -> None:
    """Export a model as shards (ONNX + safetensors, and deltas against the latest version), sign the manifest and
    make it the latest version."""
    from rich.progress import Progress

    from fedge.cloud.export import ExportError
    from fedge.cloud.publisher import BasePublisher
    from fedge.common.config import ConfigError, load_config
    from fedge.common.model import build_model, model_kwargs

    try:
        cfg = load_config(toml_path=config) if config else load_config()
        kwargs = model_kwargs(cfg) | {"precision": None}
        model = build_model(**kwargs)  # type: ignore[arg-type]
        if checkpoint is not None:
            from safetensors.torch import load_file

            if not checkpoint.is_file():
                raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
            model.load_state_dict(load_file(str(checkpoint)), strict=True)
        private = load_private_key(key)
        with Progress(transient=True) as bar:
            task = bar.add_task("exporting shards", total=cfg.model.num_experts + 4)

            def step(name: str) -> None:
                bar.update(task, advance=1, description=f"exporting {name}")

            manifest, _ = BasePublisher(store, private, image_size=cfg.model.image_size,
                                        audio_frames=cfg.model.audio_frames, onnx=onnx).publish(
                model, version=version, progress=step)
    except (ConfigError, FileNotFoundError, FileExistsError, ExportError, ValueError, RuntimeError) as e:
        typer.echo(f"fedge cloud publish: {str(e).splitlines()[0]}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"published {manifest.version} (serial {manifest.serial}): {len(manifest.shards('safetensors'))} "
               f"shards, {manifest.total_bytes()} ONNX bytes, {manifest.total_bytes('safetensors')} training bytes, "
               f"{len(manifest.shards('delta'))} deltas of {manifest.total_bytes('delta')} bytes, in "
               f"{Path(store) / manifest.version}")


def serve_command(
    store: Annotated[Path, typer.Option(help="ModelStore root directory to serve.")] = Path("runs/models"),
    host: Annotated[str, typer.Option(help="Address Serve's HTTP proxy listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of Serve's HTTP proxy.")] = 8000,
    tokens: Annotated[Path | None, typer.Option(
        help="Tokens file: when given, downloads need a device token.")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(
        help="TLS certificate (PEM); HTTPS together with --ssl-keyfile.")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    public_key: Annotated[Path | None, typer.Option(
        help="Check the latest manifest against this key before serving.")] = None,
    replicas: Annotated[int, typer.Option(min=1, help="ShardServer replicas.")] = 1,
    address: Annotated[str | None, typer.Option(
        help="Ray cluster address; default: start an embedded Ray.")] = None,
    num_cpus: Annotated[int, typer.Option(help="CPUs of the embedded Ray.")] = 2,
    public: Annotated[bool, typer.Option(
        "--public", help="Serve beyond loopback without device tokens (anyone reaching the port may download "
        "and predict); refused otherwise.")] = False,
) -> None:
    """Serve model versions to devices with Ray Serve until interrupted (Ctrl-C)."""
    from fedge.cloud.serving import check_exposure

    try:  # before Ray starts: a refused exposure costs nothing
        check_exposure(host, tokens, public=public)
        if tokens is not None and not tokens.is_file():
            raise ValueError(f"tokens file not found: {tokens} (create it with fedge cloud token DEVICE)")
    except ValueError as e:
        typer.echo(f"fedge cloud serve: {e}", err=True)
        raise typer.Exit(1) from None
    if not store.is_dir():
        typer.echo(f"fedge cloud serve: store {store} does not exist (publish a version first)", err=True)
        raise typer.Exit(1)
    import ray

    from fedge.cloud.model_store import ModelStore, StoreError
    from fedge.cloud.serving import start_shard_server
    from fedge.common.manifest import ManifestError, verify_manifest

    if public_key is not None:
        try:
            verify_manifest(ModelStore(store).manifest_bytes("latest"), load_public_key(public_key))
        except (StoreError, ManifestError, FileNotFoundError) as e:
            typer.echo(f"fedge cloud serve: {e}", err=True)
            raise typer.Exit(1) from None
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    try:
        url = start_shard_server(store, host=host, port=port, tokens_file=tokens, ssl_certfile=ssl_certfile,
                                 ssl_keyfile=ssl_keyfile, num_replicas=replicas, public=public)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"fedge cloud serve: {e}", err=True)
        ray.shutdown()
        raise typer.Exit(1) from None
    typer.echo(f"serving {store} at {url}{MODELS_ROUTE} (Ctrl-C to stop)")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
