"""``fedge edge store``: look into a SampleStore (``stats``) and export it as an evaluation NPZ (``export``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from fedge.common.dataset import is_store
from fedge.common.fsio import atomic_path
from fedge.common.units import human_bytes

__all__ = ["app", "export_command", "format_stats", "stats_command"]

app = typer.Typer(no_args_is_help=True, help="Inspect a SampleStore and export it as arrays.")

_STORE_HELP = "SampleStore directory (the --store of `fedge edge ingest`)."


def _fail(cmd: str, msg: str) -> None:
    typer.echo(f"fedge edge store {cmd}: {msg}", err=True)
    raise typer.Exit(2)


def format_stats(root: Path, st: dict[str, Any]) -> str:
    """The human-readable form of :meth:`fedge.edge.store.SampleStore.stats`."""
    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k}: {v}" for k, v in d.items()) or "none"

    span = st["time_span"]
    when = "-" if span is None else (
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(span['first']))} .. "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(span['last']))} UTC ({span['seconds']:.1f} s)")
    budget = "none" if st["budget_bytes"] is None else human_bytes(st["budget_bytes"])
    lines = [
        f"store       {root}",
        f"samples     {st['samples']}",
        f"splits      {counts(st['splits'])}",
        f"labels      {counts(st['labels'])}",
        f"modalities  {counts(st['modalities'])}",
    ]
    for split, per in st["by_split"].items():
        lines.append(f"  {split:<9} labels: {counts(per['labels'])}; modalities: {counts(per['modalities'])}")
    rej = st["rejected"]
    lines += [
        f"gate        removed {sum(rej.values())}" + (f": {counts(rej)}" if rej else ""),
        (f"bytes       payload {human_bytes(st['payload_bytes'])}, files {human_bytes(st['file_bytes'])}, "
         f"budget {budget}, evicted {st['evicted']} sample(s)"),
        f"time span   {when}",
    ]
    return "\n".join(lines)


@app.command("stats")
def stats_command(
    store: Annotated[Path, typer.Argument(help=_STORE_HELP)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Samples by split, label and modality, quality-gate removals by reason, bytes, and capture time span."""
    from fedge.edge.store import SampleStore, StoreError

    if not is_store(store):
        _fail("stats", f"{store}: not a sample store (no samples.db)")
    try:
        with SampleStore(store) as s:
            st = s.stats()
    except StoreError as e:
        _fail("stats", str(e))
    typer.echo(json.dumps(st, sort_keys=True) if as_json else format_stats(store, st))


@app.command("export")
def export_command(
    store: Annotated[Path, typer.Argument(help=_STORE_HELP)],
    out: Annotated[Path, typer.Option("--out", help="NPZ file to write (the data.eval_path format).")],
    split: Annotated[str | None, typer.Option(
        "--split", help="Only this split (train, val or test); default: every split.")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="Run config TOML whose model.image_size / n_mels / audio_frames / num_classes "
                               "shape the arrays (defaults otherwise).")] = None,
    overrides: Annotated[list[str] | None, typer.Option(
        "--set", help="Config override KEY=VALUE, repeatable (e.g. --set model.image_size=64).")] = None,
) -> None:
    """Write the store's labelled samples as an NPZ (image, audio, label, mask, quality) that `data.eval_path`,
    `simulation.pretrain_data`, `fedge cloud train --data` and `fedge evaluate --data` read."""
    import numpy as np

    from fedge.common.config import ConfigError, load_config, parse_overrides
    from fedge.common.dataset import DataError, load_data

    if split is not None and split not in ("train", "val", "test"):
        _fail("export", f"--split must be train, val or test, got {split!r}")
    if not is_store(store):
        _fail("export", f"{store}: not a sample store (no samples.db)")
    try:
        m = load_config(toml_path=config, overrides=parse_overrides(overrides or [])).model
        data = load_data(store, image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames,
                         num_classes=m.num_classes, split=split, what="store")
    except (ConfigError, FileNotFoundError, DataError) as e:
        _fail("export", str(e))
    with atomic_path(out) as tmp, open(tmp, "wb") as f:  # a file object: np.savez names it as given
        np.savez(f, **data)  # type: ignore[arg-type]
    mods = data["mask"]
    typer.echo(f"{out}: {len(data['label'])} labelled samples ({int(mods.all(1).sum())} image+audio, "
               f"{int((mods[:, 0] & ~mods[:, 1]).sum())} image, {int((mods[:, 1] & ~mods[:, 0]).sum())} audio)"
               + (f", split {split}" if split else ""))
