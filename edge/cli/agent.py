"""``fedge edge run``: the device agent (:func:`fedge.edge.agent.build_agent`), ingesting into the SampleStore and
keeping a Flower SuperNode running until SIGTERM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedge.edge.agent import AgentError, build_agent

__all__ = ["run_command"]


def run_command(
    superlink: Annotated[str, typer.Option("--superlink", help="SuperLink Fleet API address, HOST:PORT.")],
    store: Annotated[Path, typer.Option("--store", help="The device's SampleStore directory (created if absent).")],
    video: Annotated[str | None, typer.Option(
        "--video", help="Camera source to ingest: file, device index, URL, or an image folder or glob.")] = None,
    audio: Annotated[str | None, typer.Option(
        "--audio", help="Microphone to ingest: alsa:hw:1 (or hw:1), pulse:default, a FIFO, or a file.")] = None,
    root_certificates: Annotated[Path | None, typer.Option(
        "--root-certificates", help="CA certificate (PEM) to verify the SuperLink: enables TLS.")] = None,
    auth_keys: Annotated[Path | None, typer.Option(
        "--auth-keys", help="This node's auth key dir (from `fedge cloud certs`) or key file: node auth.")] = None,
    device_id: Annotated[str, typer.Option("--device-id", help="Stable device name (default: the store's name).")]
    = "",
    modalities: Annotated[str, typer.Option(
        "--modalities", help="Comma-separated modalities the device has (default: those with a source).")] = "",
    profile: Annotated[str, typer.Option("--profile", help="Where local training runs: auto, cpu or gpu.")]
    = "auto",
    threads: Annotated[int, typer.Option("--threads", help="CPU threads for local training.")] = 1,
    port: Annotated[int, typer.Option("--port", help="Local port of the SuperNode's ClientApp API.")] = 9094,
    ingest_arg: Annotated[list[str] | None, typer.Option(
        "--ingest-arg", help="Extra argument passed to `fedge edge ingest` (repeatable).")] = None,
    grace: Annotated[float, typer.Option("--grace", help="Seconds children get to stop on SIGTERM.")] = 20.0,
    shards: Annotated[str, typer.Option(
        "--shards", help="Shard server URL (https://host:port) to fetch published bases from; the download token "
                         "comes from FEDGE_SHARD_TOKEN.")] = "",
    shards_public_key: Annotated[Path | None, typer.Option(
        "--shards-public-key", help="Pinned Ed25519 public key (PEM) every manifest must be signed with.")] = None,
    shards_ca: Annotated[Path | None, typer.Option(
        "--shards-ca", help="CA (PEM) of the shard server's TLS certificate (default: the system store).")] = None,
    shards_cache: Annotated[Path | None, typer.Option(
        "--shards-cache", help="Shard cache folder (default: <store>/agent-state/shards).")] = None,
) -> None:
    """Run the device agent: ingest sources into the store and train with the federation (SIGTERM stops it).

    Starts `fedge edge ingest` for the given sources and a Flower SuperNode running fedge's ClientApp
    against the SuperLink; restarts either when it fails, reconnects after network loss, and keeps the
    device's adapter state in <store>/agent-state.
    """
    from fedge.common.config import ConfigError

    try:
        mods = tuple(s.strip() for s in modalities.split(",") if s.strip()) or None
        agent = build_agent(superlink=superlink, store=store, video=video, audio=audio,
                            root_certificates=root_certificates, auth_keys=auth_keys, device_id=device_id,
                            modalities=mods, profile=profile, threads=threads, port=port,
                            ingest_args=ingest_arg or (), grace_s=grace, shards_url=shards,
                            shards_public_key=shards_public_key, shards_ca=shards_ca, shards_cache=shards_cache)
    except (AgentError, ConfigError) as e:
        typer.echo(f"fedge edge run: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(agent.run())
