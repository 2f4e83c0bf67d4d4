"""``fedge evaluate``: accuracy of a run's final global model, or of a saved base / adapters, on a store or NPZ.

What is evaluated (the first argument):

* a run directory (``fedge simulate`` / ``flwr run`` with ``run_dir``): its resolved ``config.toml`` (or
  ``config.json``), its final ``global_adapters.npz``, and the base they belong to: the newest base that global
  training saved under ``bases/``, else the run's ``model.base_path``, else the seed's init;
* an adapters file (``.npz`` as the aggregator saves it, or ``.safetensors`` holding LoRA factors) on the base
  named by ``--base`` or the config's ``model.base_path``;
* a base file (``.safetensors`` of plain weights, as ``fedge cloud train`` or the simulation's pretraining save).

The model's shape comes from the run's config, or ``--config`` / ``--set`` for a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = [
    "ADAPTERS_FILE",
    "BASES_DIR",
    "EvaluateError",
    "evaluate_command",
    "evaluate_target",
    "format_report",
    "resolve_model",
]

ADAPTERS_FILE = "global_adapters.npz"  # what the ServerApp leaves in its run directory
BASES_DIR = "bases"  # where global training inside a run saves each new base


class EvaluateError(ValueError):
    """The model or data cannot be evaluated; the message is one line."""


def _run_config(run_dir: Path, overrides: dict[str, Any]) -> Any:
    from fedge.common.config import load_config

    if (run_dir / "config.toml").is_file():
        return load_config(toml_path=run_dir / "config.toml", overrides=overrides)
    if (run_dir / "config.json").is_file():
        return load_config(run_config=json.loads((run_dir / "config.json").read_text()), overrides=overrides)
    raise EvaluateError(f"{run_dir}: no config.toml or config.json (not a run directory)")


def _state_file(path: Path) -> dict[str, Any]:
    """Tensors of an ``.npz`` or ``.safetensors`` file as NumPy arrays."""
    import zipfile

    import numpy as np
    from safetensors import SafetensorError

    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, SafetensorError) as e:
        raise EvaluateError(f"{path}: not a readable model file ({str(e).splitlines()[0] if str(e) else e!r})") \
            from None


def resolve_model(target: Path, *, config: Path | None, overrides: dict[str, Any],
                  base: Path | None) -> tuple[Any, str, dict[str, Any] | None, str]:
    """(config, base path or "", adapters or None, description) of what ``target`` names.

    Raises
    ------
    EvaluateError
        ``target`` is missing, a run directory without a final model, or an unknown kind of file.
    """
    from fedge.common.config import load_config
    from fedge.common.lora import is_adapter_key

    if target.is_dir():
        if config is not None:
            raise EvaluateError("--config is for a model file; a run directory brings its own config")
        cfg = _run_config(target, overrides)
        adapters = target / ADAPTERS_FILE
        if not adapters.is_file():
            raise EvaluateError(f"{target}: no final global model ({ADAPTERS_FILE}); did the run finish?")
        bases = sorted((target / BASES_DIR).glob("base-*.safetensors"))
        base_path = str(base) if base else str(bases[-1]) if bases else cfg.model.base_path
        return cfg, base_path, _state_file(adapters), f"run {target.resolve()}"
    if not target.is_file():
        raise EvaluateError(f"{target}: not found (give a run directory, an adapters .npz or a .safetensors file)")
    if target.suffix not in (".npz", ".safetensors"):
        raise EvaluateError(f"{target}: unknown model file (expected a run directory, .npz or .safetensors)")
    cfg = load_config(toml_path=config, overrides=overrides)
    state = _state_file(target)
    # an .npz is the aggregator's global state (the adapters, or more under train.scope); a .safetensors with
    # LoRA factors is adapters (`fedge cloud train`), without them a base
    if target.suffix == ".npz" or any(is_adapter_key(k) and ("lora_A" in k or "lora_B" in k) for k in state):
        base_path = str(base) if base else cfg.model.base_path
        return cfg, base_path, state, f"adapters {target.resolve()}"
    if base is not None:
        raise EvaluateError(f"{target} holds base weights; --base is only for an adapters file")
    return cfg, str(target), None, f"base {target.resolve()}"


def evaluate_target(target: Path, data: Path, *, config: Path | None = None, overrides: dict[str, Any] | None = None,
                    base: Path | None = None, split: str | None = None) -> dict[str, Any]:
    """The :func:`fedge.common.evaluation.evaluation_report` of ``target`` on ``data``, plus ``model`` and ``data``."""
    from fedge.common.base_weights import BaseWeightsError
    from fedge.common.dataset import describe, load_data
    from fedge.common.evaluation import evaluation_report, model_with

    cfg, base_path, adapters, what = resolve_model(target, config=config, overrides=overrides or {}, base=base)
    m = cfg.model
    arrays = load_data(data, image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames,
                       num_classes=m.num_classes, split=split, what="--data")
    try:
        model = model_with(cfg, adapters, base_path=base_path)
    except (KeyError, ValueError) as e:  # BaseWeightsError is a ValueError
        kind = "base" if isinstance(e, BaseWeightsError) else "adapters"
        raise EvaluateError(f"{what}: the {kind} do not fit the configured model: {str(e).splitlines()[0]}") \
            from None
    rep = evaluation_report(model, arrays, num_classes=m.num_classes)
    return {**rep, "model": what, "data": describe(data) + (f" (split {split})" if split else "")}


def format_report(rep: dict[str, Any]) -> str:
    """The human-readable form: accuracies, per-class accuracy and the confusion matrix."""
    def acc(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = [f"model  {rep['model']}", f"data   {rep['data']}", "",
             f"{'inputs':<28}{'samples':>8}  accuracy",
             f"{'own modalities (fused)':<28}{rep['n']:>8}  {acc(rep['accuracy'])}"]
    for name in ("image+audio", "image", "audio"):
        label = f"{name} (both)" if name == "image+audio" else f"{name} only"
        lines.append(f"{label:<28}{rep['subset_n'][name]:>8}  {acc(rep[name])}")
    lines += ["", "per class (true label: samples, accuracy)"]
    lines += [f"  {c['label']:>3}: {c['n']:>6}  {acc(c['accuracy'])}" for c in rep["per_class"] if c["n"]]
    cm = rep["confusion"]
    w = max(4, len(str(max(max(r) for r in cm))) + 1)
    lines += ["", "confusion matrix (rows: true label, columns: predicted)",
              " " * 5 + "".join(f"{j:>{w}}" for j in range(len(cm)))]
    lines += [f"{i:>4} " + "".join(f"{v:>{w}}" for v in row) for i, row in enumerate(cm)]
    return "\n".join(lines)


def evaluate_command(
    target: Annotated[Path, typer.Argument(
        help="A run directory (its final global model), an adapters file (.npz / .safetensors with LoRA "
             "factors) or a base file (.safetensors).")],
    data: Annotated[Path, typer.Option(
        "--data", help="Labelled data: a SampleStore directory or an NPZ (image, audio, label, mask, quality).")],
    as_json: Annotated[bool, typer.Option(
        "--json", help='Print one JSON object: {"n", "accuracy", "image+audio", "image", "audio", '
                       '"per_class", "confusion", ...}.')] = False,
    split: Annotated[str | None, typer.Option(
        "--split", help="Only this split of a store (train, val or test); default: every split.")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="Run config TOML giving the model's shape, for a model file (a run directory "
                               "brings its own).")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Config override KEY=VALUE, repeatable (e.g. --set model.num_classes=4).")] = None,
    base: Annotated[Path | None, typer.Option(
        "--base", help="Base weights (.safetensors) the adapters belong to (default: the config's "
                       "model.base_path, or the newest base a run's global training saved).")] = None,
) -> None:
    """Accuracy of a global model on a store or NPZ: overall (each sample's own modalities), image+audio,
    image only, audio only, per class, and the confusion matrix."""
    def fail(msg: str) -> None:
        typer.echo(f"fedge evaluate: {msg}", err=True)
        raise typer.Exit(2)

    if split is not None and split not in ("train", "val", "test"):
        fail(f"--split must be train, val or test, got {split!r}")
    from fedge.common.config import ConfigError, parse_overrides
    from fedge.common.dataset import DataError

    try:
        rep = evaluate_target(target, data, config=config, overrides=parse_overrides(overrides or []), base=base,
                              split=split)
    except (EvaluateError, DataError, ConfigError, FileNotFoundError) as e:
        fail(str(e))
    except ImportError as e:  # a core install without the edge or cloud extra
        fail(f"needs torch (install fedge[edge] or fedge[cloud]): {e}")
    typer.echo(json.dumps(rep) if as_json else format_report(rep))
