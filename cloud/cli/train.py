"""``fedge cloud train``: one on-demand global training run (merge adapters, train on curated cloud data)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fedge.common.fsio import atomic_path

__all__ = ["train_command"]


def _load_state(path: Path) -> dict:
    """A state dict from ``.safetensors`` or ``.npz`` (the aggregator's adapter file)."""
    if path.suffix == ".npz":
        import numpy as np

        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    from safetensors.torch import load_file

    return load_file(str(path))


def _save_state(state: dict, out: Path) -> None:
    """Write a state dict as safetensors atomically."""
    from safetensors.torch import save_file

    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))


def _progress(jsonl: Path, total: int, stop: threading.Event) -> None:
    """A progress bar fed by rank 0's metric reports (the fit itself blocks the main thread)."""
    from tqdm import tqdm

    from fedge.cloud.metrics import read_metrics

    with tqdm(total=total, desc="global training", unit="step") as bar:
        while not stop.is_set():
            recs = read_metrics(jsonl)
            if recs:
                last = recs[-1]
                bar.n = int(last["step"])
                bar.set_postfix(loss=f"{last['loss/train']:.3f}", acc=f"{last.get('accuracy/all', 0):.3f}")
                bar.refresh()
            stop.wait(0.5)


def _publish(state: dict, *, store: Path, key: Path, base_version: int, cfg: Any) -> dict:
    """Publish a trained base as ``base-<base_version>``; return the published weights (torch tensors)."""
    import torch

    from fedge.cloud.publisher import BasePublisher, base_version_name, plain_from_state
    from fedge.common.model import model_kwargs

    plain = plain_from_state({k: v.detach().cpu().float().numpy() for k, v in state.items()}, model_kwargs(cfg))
    manifest, published = BasePublisher(store, key, image_size=cfg.model.image_size,
                                        audio_frames=cfg.model.audio_frames, onnx=cfg.publish.onnx,
                                        deltas=cfg.publish.deltas).publish(plain,
                                                                           version=base_version_name(base_version))
    typer.echo(f"published {manifest.version} (serial {manifest.serial}) into {store}: "
               f"{manifest.total_bytes('safetensors')} training bytes, {manifest.total_bytes('delta')} delta bytes")
    return {k: torch.from_numpy(v) for k, v in published.items()}


def train_command(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Run config TOML (defaults otherwise).")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Config override KEY=VALUE, repeatable (e.g. --set training.steps=100 "
                      "--set training.workers=2).")] = None,
    base: Annotated[Path | None, typer.Option(
        "--base", help="Current base (safetensors); default: the deterministic version-0 base.")] = None,
    adapters: Annotated[Path | None, typer.Option(
        "--adapters", help="The aggregator's newest global adapters (.npz or .safetensors) to merge first.")] = None,
    base_version: Annotated[int, typer.Option(
        "--base-version", help="Aggregated version those adapters belong to.")] = 0,
    out: Annotated[Path, typer.Option(
        "--out", help="Directory for base.safetensors, adapters.safetensors (fresh, for the new base) and "
                      "result.json.")] = Path("runs/train/latest"),
    address: Annotated[str, typer.Option("--address", help="Ray cluster to join (default: an embedded Ray).")] = "",
    data: Annotated[Path | None, typer.Option(
        "--data", help="The cloud's labelled training data: a SampleStore directory or an NPZ (image, audio, "
                       "label, mask, quality); sets training.data_path. Default: the config's training.data_path, "
                       "else generated and curated data.")] = None,
    publish: Annotated[Path | None, typer.Option(
        "--publish", help="Model store to publish the new base into (signed, with deltas against its latest "
                          "version) as base-<base-version>; devices then fetch it by that name.")] = None,
    key: Annotated[Path, typer.Option(
        "--key", help="Ed25519 private key that signs the published manifest (with --publish).")] = Path(
        "keys/manifest.key"),
) -> None:
    """Merge the global adapters into the MoE base, train experts, router and encoders on curated cloud data
    with Ray Train (DDP, checkpoints, worker-failure recovery), and write the new base with fresh adapters.
    """
    import ray

    from fedge.cloud.training import (
        GlobalTrainer,
        TrainingError,
        fresh_adapters,
        initial_base,
        merge_adapters,
        training_dataset,
    )
    from fedge.common.config import ConfigError, load_config, parse_overrides
    from fedge.common.dataset import is_store
    from fedge.common.model import model_kwargs

    try:
        cfg = load_config(toml_path=config, overrides={**parse_overrides(overrides or []),
                                                        **({"training.data_path": str(data)} if data else {})})
    except (ConfigError, FileNotFoundError) as e:
        typer.echo(f"fedge cloud train: {e}", err=True)
        raise typer.Exit(2) from None
    for what, p in (("base", base), ("adapters", adapters), *((("signing key", key),) if publish else ())):
        if p is not None and not p.is_file():
            typer.echo(f"fedge cloud train: {what} file not found: {p}", err=True)
            raise typer.Exit(2)
    if data is not None and not (data.is_file() or is_store(data)):  # before Ray starts
        typer.echo(f"fedge cloud train: --data {data}: neither a sample store directory nor an NPZ file", err=True)
        raise typer.Exit(2)
    import zipfile

    from safetensors import SafetensorError

    try:
        base_state = _load_state(base) if base is not None else None
        ad_state = _load_state(adapters) if adapters is not None else None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, SafetensorError) as e:  # truncated or foreign
        typer.echo(f"fedge cloud train: cannot read state file: {e}", err=True)
        raise typer.Exit(2) from None
    mkw = model_kwargs(cfg)
    try:  # fail fast, before Ray starts: the states must fit the configured model
        merge_adapters(base_state if base_state is not None else initial_base(mkw),
                       ad_state if ad_state is not None else fresh_adapters(initial_base(mkw), mkw=mkw,
                                                                             rank=cfg.model.lora_rank,
                                                                             alpha=cfg.model.lora_alpha),
                       mkw=mkw, rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha)
    except TrainingError as e:
        typer.echo(f"fedge cloud train: {e}", err=True)
        raise typer.Exit(2) from None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    trainer = GlobalTrainer.from_config(cfg)
    name = f"base-{base_version:06d}-{time.strftime('%Y%m%d-%H%M%S')}"
    stop = threading.Event()
    bar = threading.Thread(target=_progress, args=(trainer.storage_path / name / "metrics" / "metrics.jsonl",
                                                   trainer.steps, stop), daemon=True)
    try:
        typer.echo(f"reading the cloud data in {cfg.training.data_path} ..." if cfg.training.data_path else
                   f"curating {cfg.training.samples} samples of cloud data on Ray Data ...")
        ds = training_dataset(cfg)
        bar.start()
        res = trainer.train(base_state if base_state is not None else initial_base(trainer.mkw), ad_state, ds,
                            base_version=base_version, name=name)
    except TrainingError as e:
        typer.echo(f"fedge cloud train: {e}", err=True)
        raise typer.Exit(1) from None
    finally:
        stop.set()
        ray.shutdown()
    if publish is not None:  # devices rebuild the published weights: the operator's copy is the same
        try:
            res.base_state = _publish(res.base_state, store=publish, key=key, base_version=base_version, cfg=cfg)
        except (FileExistsError, OSError, ValueError, RuntimeError) as e:
            _save_state(res.base_state, out / "base.safetensors")
            typer.echo(f"fedge cloud train: publishing failed ({str(e).splitlines()[0]}); the unpublished base is "
                       f"in {out / 'base.safetensors'}", err=True)
            raise typer.Exit(1) from None
    _save_state(res.base_state, out / "base.safetensors")
    _save_state(res.adapters, out / "adapters.safetensors")
    (out / "result.json").write_text((res.run_dir / "result.json").read_text())
    last = res.metrics[-1]
    typer.echo(f"{res.steps} steps in {res.seconds:.1f}s; loss {res.first_loss():.4f} -> {res.last_loss():.4f}; "
               f"accuracy image {last.get('accuracy/image', 0):.3f} audio {last.get('accuracy/audio', 0):.3f} "
               f"all {last.get('accuracy/all', 0):.3f}; worker failures survived {len(res.failures)}")
    typer.echo(f"new base -> {out / 'base.safetensors'}; metrics (JSONL + TensorBoard) -> {res.run_dir / 'metrics'}")
