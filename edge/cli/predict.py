"""``fedge edge predict``: classify a device's keyframes / audio windows with the sharded model
(:func:`fedge.edge.predict.predict_sources`), fetching only the shards this device needs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fedge.common.config import ConfigError, load_config
from fedge.common.manifest import ManifestError
from fedge.edge.predict import predict_sources
from fedge.edge.shards import ShardCache, ShardError

__all__ = ["predict_command"]


def predict_command(
    shards: Annotated[str | None, typer.Option("--shards", help="Shard server URL (default: shards.url).")] = None,
    video: Annotated[Path | None, typer.Option(
        "--video", help="Video file / camera index, or keyframes (.npy).")] = None,
    audio: Annotated[Path | None, typer.Option(
        "--audio", help="Audio file (or a video with an audio track), or log-mel windows (.npy).")] = None,
    public_key: Annotated[Path | None, typer.Option(
        help="Pinned manifest key (default: shards.public_key).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(
        help="Shard cache folder (default: shards.cache_dir or ~/.cache/fedge/shards).")] = None,
    ca_file: Annotated[Path | None, typer.Option(
        help="CA of the server's TLS certificate (default: shards.ca_file).")] = None,
    device: Annotated[str | None, typer.Option(help="Device id sent with the token.")] = None,
    token: Annotated[str | None, typer.Option(envvar="FEDGE_SHARD_TOKEN", help="Per-device download token.")] = None,
    modalities: Annotated[str | None, typer.Option(
        help="Device modalities, e.g. 'audio' (default: the inputs given).")] = None,
    version: Annotated[str, typer.Option(help="Model version to use.")] = "latest",
    config: Annotated[Path | None, typer.Option(help="Run config TOML (its shards section).")] = None,
    allow_insecure_http: Annotated[bool, typer.Option(
        "--allow-insecure-http", help="Send the token to a plain http:// server (trusted networks only; "
        "default: shards.allow_insecure_http).")] = False,
) -> None:
    """Print the predicted class of each keyframe / audio window, fetching only the shards this device needs."""
    from fedge.edge.inference import ShardedRunner

    try:
        cfg = load_config(toml_path=config).shards if config else load_config().shards
        url = shards or cfg.url
        key = public_key or (Path(cfg.public_key) if cfg.public_key else None)
        if not url:
            raise ValueError("no shard server: pass --shards URL or set shards.url")
        if key is None:
            raise ValueError("no pinned manifest key: pass --public-key or set shards.public_key")
        if video is None and audio is None:
            raise ValueError("nothing to classify: pass --video and/or --audio")
        mods = tuple(m.strip() for m in modalities.split(",")) if modalities else tuple(
            m for m, src in (("image", video), ("audio", audio)) if src is not None
        )
        cache = ShardCache(
            url,
            cache_dir or (Path(cfg.cache_dir) if cfg.cache_dir else Path.home() / ".cache/fedge/shards"),
            public_key=key,
            modalities=mods,
            budget_bytes=int(cfg.budget_mb * (1 << 20)),
            token=token,
            device=device,
            ca_file=ca_file or (cfg.ca_file or None),
            version=version,
            timeout=cfg.timeout_s,
            allow_insecure_http=allow_insecure_http or cfg.allow_insecure_http,
        )
        runner = ShardedRunner(cache)
        out, times = predict_sources(runner, video=video, audio=audio)
    except (ConfigError, ManifestError, ShardError, ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        typer.echo(f"fedge edge predict: {str(e).splitlines()[0]}", err=True)
        raise typer.Exit(1) from None
    unit = "keyframe" if video is not None else "window"
    for i, (c, p) in enumerate(zip(out.predictions.tolist(), out.probs.max(axis=1).tolist())):
        typer.echo(f"{unit} {i} t={times[i]:.2f}s: class {c} (p={p:.3f}) experts {out.experts[i]}")
    typer.echo(
        f"version {out.version}; downloaded {cache.stats.downloaded_bytes} bytes; cached "
        f"{cache.cached_bytes()} of {runner.manifest.total_bytes()} model bytes ({os.fspath(cache.dir)})"
    )
