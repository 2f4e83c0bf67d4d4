"""``fedge edge predict``: classify a device's keyframes / audio windows with the sharded model.

Inputs (until the stream front-ends are wired in here): ``.npy`` arrays — ``--video`` keyframes
(B, 3, S, S) float in [0, 1] or (B, S, S, 3) uint8, ``--audio`` log-mel windows (B, n_mels, T) in dB. With both,
row i of each is the same moment. The device's modalities are those given (or ``--modalities``); it downloads
only their encoders, the router, the head and the experts its router picks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from common.config import ConfigError, load_config
from common.manifest import ManifestError

from .shards import ShardCache, ShardError


def load_keyframes(src: Path, size: int) -> np.ndarray:
    """Keyframes from ``src`` as (B, 3, size, size) float32 in [0, 1]."""
    if src.suffix != ".npy":
        raise ValueError(f"{src}: only .npy keyframe arrays are supported here")
    a = np.load(src, allow_pickle=False)
    if a.ndim == 4 and a.shape[-1] == 3 and a.shape[1] != 3:  # (B, H, W, 3) images
        a = a.transpose(0, 3, 1, 2)
    if a.ndim != 4 or a.shape[1:] != (3, size, size):
        raise ValueError(f"{src}: keyframes must be (B, 3, {size}, {size}) or (B, {size}, {size}, 3), got {a.shape}")
    a = a.astype(np.float32) / 255.0 if a.dtype == np.uint8 else a.astype(np.float32)
    return a


def load_windows(src: Path, n_mels: int, frames: int) -> np.ndarray:
    """Log-mel windows from ``src`` as (B, n_mels, frames) float32."""
    if src.suffix != ".npy":
        raise ValueError(f"{src}: only .npy log-mel arrays are supported here")
    a = np.load(src, allow_pickle=False)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1:] != (n_mels, frames):
        raise ValueError(f"{src}: log-mel windows must be (B, {n_mels}, {frames}), got {a.shape}")
    return a.astype(np.float32)


def predict_command(
    shards: Annotated[str | None, typer.Option("--shards", help="Shard server URL (default: shards.url).")] = None,
    video: Annotated[Path | None, typer.Option("--video", help="Keyframes (.npy).")] = None,
    audio: Annotated[Path | None, typer.Option("--audio", help="Log-mel windows (.npy).")] = None,
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
) -> None:
    """Print the predicted class of each keyframe / audio window, fetching only the shards this device needs."""
    from .inference import ShardedRunner

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
        )
        runner = ShardedRunner(cache)
        spec = runner.manifest.model
        img = load_keyframes(video, spec["image_size"]) if video is not None else None
        aud = load_windows(audio, spec["n_mels"], spec["audio_frames"]) if audio is not None else None
        out = runner.predict(image=img, audio=aud)
    except (ConfigError, ManifestError, ShardError, ValueError, FileNotFoundError, OSError) as e:
        typer.echo(f"fedge edge predict: {str(e).splitlines()[0]}", err=True)
        raise typer.Exit(1) from None
    unit = "keyframe" if img is not None else "window"
    for i, (c, p) in enumerate(zip(out.predictions.tolist(), out.probs.max(axis=1).tolist())):
        typer.echo(f"{unit} {i}: class {c} (p={p:.3f}) experts {out.experts[i]}")
    typer.echo(
        f"version {out.version}; downloaded {cache.stats.downloaded_bytes} bytes; cached "
        f"{cache.cached_bytes()} of {runner.manifest.total_bytes()} model bytes ({os.fspath(cache.dir)})"
    )
