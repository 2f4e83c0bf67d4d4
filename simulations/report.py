"""The report of a simulation run: PNG plots, TensorBoard events and a Markdown summary, from the run directory.

Reads ``metrics.jsonl`` (one record per global version, written by the ServerApp), ``config.json``,
``prepared.json`` and, when the server saved them, the final global adapters (``global_adapters.npz``), which it
evaluates on the held-out set fused and per modality. Plots: accuracy against virtual time and against bytes sent,
the staleness histogram of accepted updates, per-modality accuracy, rejected updates by reason.
Records written by older servers may lack keys (``virtual_time``, ``staleness``, ``rejected``); the report says
what it could not show instead of inventing it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedge.common.run_log import VersionRecord, read_versions

from .evaluation import ADAPTERS, load_arrays, modality_accuracy, model_with

__all__ = [
    "REPORT",
    "base_modality_accuracy",
    "data_names",
    "final_modality_accuracy",
    "first_reaching",
    "gain_lines",
    "heldout_modality_accuracy",
    "plot_curves",
    "rejections",
    "series",
    "staleness_values",
    "write_report",
]

REPORT = "report.md"


# ------------------------------------------------------------------------------------------------ pure
def _or_nan(v: float | None) -> float:
    return np.nan if v is None else float(v)


def series(records: Sequence[VersionRecord]) -> dict[str, np.ndarray]:
    """Per-version arrays: version, accuracy, time (virtual seconds, or NaN), cumulative bytes sent."""
    version = np.array([r.version for r in records], dtype=float)
    acc = np.array([_or_nan(r.accuracy) for r in records], dtype=float)
    vt = np.array([_or_nan(r.virtual_time) for r in records], dtype=float)
    if records and records[0].bytes_sent is not None:
        sent = np.array([_or_nan(r.bytes_sent) for r in records], dtype=float)
    else:
        sent = np.cumsum([float(r.upload_bytes or 0) for r in records])
    return {"version": version, "accuracy": acc, "time": vt, "bytes": sent}


def first_reaching(x: np.ndarray, acc: np.ndarray, target: float) -> float | None:
    """The first x at which accuracy reaches ``target`` (None if never)."""
    hit = np.flatnonzero(acc >= target)
    return float(x[hit[0]]) if len(hit) else None


def staleness_values(records: Sequence[VersionRecord]) -> list[int]:
    """All staleness values of accepted updates reported by the server."""
    return [s for r in records for s in r.staleness or ()]


def rejections(records: Sequence[VersionRecord]) -> dict[str, int]:
    """Rejected updates by reason: the server's counters are cumulative, so the last record's."""
    return dict(records[-1].rejected or {}) if records else {}


def data_names(cfg: dict[str, Any], prepared: dict[str, Any]) -> dict[str, str]:
    """What the run trained, evaluated and pretrained on, in words (``training``, ``evaluation``, ``pretraining``).

    ``prepared`` (the run's ``prepared.json``) names data the user gave; otherwise the names follow from the
    config: rendered AV digits, or generated synthetic partitions.
    """
    dataset, part = cfg.get("simulation.dataset", "?"), cfg.get("data.partition", "?")
    rendered = {"avdigits": f"AV digits rendered and ingested per device, partition {part}",
                "synthetic": f"synthetic, generated per device, partition {part}"}
    out = {"training": str(prepared.get("train") or rendered.get(dataset, f"{dataset}, partition {part}"))}
    ev = prepared.get("eval") or (f"NPZ {cfg['data.eval_path']}" if cfg.get("data.eval_path") else "")
    out["evaluation"] = str(ev or "none (data.eval_path is empty: no accuracy)")
    if prepared.get("eval_samples") and "none" not in out["evaluation"]:
        out["evaluation"] += f" ({prepared['eval_samples']} labelled samples)"
    if prepared.get("pretrain"):
        out["pretraining"] = str(prepared["pretrain"])
    elif prepared.get("cloud_samples"):
        out["pretraining"] = f"the cloud's rendered share ({prepared['cloud_samples']} samples)"
    return out


# ------------------------------------------------------------------------------------------------ I/O
def _plt():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: dict[str, list[VersionRecord]], out: Path, *, target: float = 0.0,
                title: str = "") -> list[str]:
    """Accuracy vs virtual time and vs bytes sent, one line per run; returns the PNG names written."""
    plt = _plt()
    written = []
    has_time = any(np.isfinite(series(r)["time"]).any() for r in runs.values() if r)
    panels = [("time", "virtual time (s)" if has_time else "global version", "accuracy_vs_time.png"),
              ("bytes", "bytes sent by devices (MB)", "accuracy_vs_bytes.png")]
    for key, xlabel, name in panels:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, recs in runs.items():
            s = series(recs)
            x = s[key] if key != "time" or has_time else s["version"]
            x = x / 1e6 if key == "bytes" else x
            ax.plot(x, s["accuracy"], marker="o", ms=3, label=label)
        if target:
            ax.axhline(target, ls="--", c="gray", lw=1, label=f"target {target:.2f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out accuracy")
        ax.set_title(title or "global model accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _bar(values: dict[str, float], out: Path, name: str, *, title: str, ylabel: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(list(values), list(values.values()), color="tab:blue")
    for i, v in enumerate(values.values()):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _staleness_hist(values: list[int], out: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.arange(0, max(values) + 2) - 0.5
    ax.hist(values, bins=bins, color="tab:orange", rwidth=0.9)
    ax.set_xlabel("staleness (versions behind at arrival)")
    ax.set_ylabel("accepted updates")
    ax.set_title("staleness of accepted updates")
    fig.tight_layout()
    fig.savefig(out / "staleness_hist.png", dpi=110)
    plt.close(fig)
    return "staleness_hist.png"


def _tensorboard(records: list[VersionRecord], out: Path) -> None:
    """TensorBoard scalars per version, unless the ServerApp already wrote them live (``dashboard.tensorboard``)."""
    from torch.utils.tensorboard import SummaryWriter

    from fedge.cloud.dashboard.tensorboard import has_events, scalars

    if has_events(out / "tb"):
        return
    w = SummaryWriter(str(out / "tb"))
    s = series(records)
    for i, r in enumerate(records):
        step = int(s["version"][i])
        for k, v in scalars(r).items():
            w.add_scalar(k, v, step)
        w.add_scalar("bytes_sent_cumulative", float(s["bytes"][i]), step)
    w.close()


def heldout_modality_accuracy(cfg_flat: dict[str, Any], state: Any) -> dict[str, float]:
    """Per-modality accuracy on the run's held-out set of its base with the global ``state`` of its
    ``train.scope`` loaded (None: the initial state, which changes no output of the base); empty without a set."""
    from fedge.common.config import load_config
    from fedge.common.dataset import load_data

    eval_path = cfg_flat.get("data.eval_path", "")
    if not eval_path or not Path(eval_path).exists():
        return {}
    cfg = load_config(run_config=cfg_flat)
    m = cfg.model
    held = load_data(eval_path, image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames,
                     num_classes=m.num_classes, what="data.eval_path")  # a store or an NPZ
    return modality_accuracy(model_with(cfg, state), held)


def final_modality_accuracy(run_dir: Path, cfg_flat: dict[str, Any]) -> dict[str, float]:
    """Per-modality accuracy of the final global adapters on the held-out set (empty if not saved)."""
    path = run_dir / ADAPTERS
    return heldout_modality_accuracy(cfg_flat, load_arrays(path)) if path.is_file() else {}


def base_modality_accuracy(cfg_flat: dict[str, Any]) -> dict[str, float]:
    """Per-modality accuracy of the model the federation started from (the base, before any version)."""
    return heldout_modality_accuracy(cfg_flat, None)


def gain_lines(base: dict[str, float], final: dict[str, float]) -> list[str]:
    """Markdown: per input subset the accuracy the base started at, the federation ended at, and what it added;
    then one sentence on the fused result against each single modality."""
    rows = ["| inputs | base (start) | federated (end) | added by the federation |", "|---|---|---|---|"]
    for k, v in final.items():
        b = base.get(k)
        rows.append(f"| {k} | {b:.4f} | {v:.4f} | {100 * (v - b):+.1f} points |" if b is not None
                    else f"| {k} | - | {v:.4f} | - |")
    fused = final.get("image+audio")
    singles = {k: v for k, v in final.items() if k != "image+audio"}
    if fused is not None and singles:
        worse = [k for k, v in singles.items() if fused < v]
        rows += ["", ("Fused (image+audio) is at least as accurate as each modality alone." if not worse else
                      "Fused (image+audio) is below " + " and ".join(f"{k} alone ({singles[k]:.4f})" for k in worse)
                      + f": {fused:.4f}.")]
    if fused is not None and "image+audio" in base:
        rows += ["", (f"The base started at {base['image+audio']:.4f} (fused); the federation ended at {fused:.4f}: "
                      f"{100 * (fused - base['image+audio']):+.1f} points.")]
    return rows


def write_report(run_dir: str | Path) -> Path:
    """Write plots, TensorBoard events and ``report.md`` into ``run_dir``; return the report path."""
    out = Path(run_dir)
    records = read_versions(out)
    cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    prepared = json.loads((out / "prepared.json").read_text()) if (out / "prepared.json").is_file() else {}
    target = float(cfg.get("simulation.target_accuracy", 0.0) or 0.0)
    lines = [f"# fedge simulation report: `{out.name}`", ""]
    if not records:
        lines += ["No global version was produced (metrics.jsonl is empty)."]
        (out / REPORT).write_text("\n".join(lines) + "\n")
        return out / REPORT

    s = series(records)
    plots = plot_curves({cfg.get("aggregation.mode", "run"): records}, out, target=target)
    _tensorboard(records, out)
    has_time = bool(np.isfinite(s["time"]).any())
    evaluated = bool(np.isfinite(s["accuracy"]).any())
    wall = (out / "wall_seconds.txt").read_text().strip() if (out / "wall_seconds.txt").is_file() else "?"
    lines += [
        "| | |", "|---|---|",
        f"| devices | {cfg.get('simulation.devices', '?')} |",
        *[f"| {k} data | {v} |" for k, v in data_names(cfg, prepared).items()],
        (f"| aggregation | {cfg.get('aggregation.mode', '?')} (K={cfg.get('aggregation.buffer_size', '?')}, "
         f"C={cfg.get('aggregation.concurrency', '?')}, staleness {cfg.get('aggregation.staleness', '?')}) |"),
        (f"| compression | {cfg.get('communication.compression', '?')} "
         f"(top-k {cfg.get('communication.topk_ratio', '?')}, {cfg.get('communication.quant_bits', '?')} bit) |"),
        f"| global versions | {len(records)} |",
        ("| final accuracy | " + (f"{s['accuracy'][-1]:.4f} (best {np.nanmax(s['accuracy']):.4f})" if evaluated
                                   else "none: no evaluation set (data.eval_path is empty)") + " |"),
        "| virtual time | " + (f"{s['time'][-1]:.1f} s" if has_time else "not reported by the server") + " |",
        f"| bytes sent by devices | {s['bytes'][-1] / 1e6:.3f} MB |",
        f"| wall time | {wall} s |",
    ]
    if target and evaluated:
        t_hit = first_reaching(s["time"] if has_time else s["version"], s["accuracy"], target)
        b_hit = first_reaching(s["bytes"], s["accuracy"], target)
        unit = "s virtual" if has_time else "versions"
        lines.append(f"| target accuracy {target:.2f} | "
                     + (f"reached after {t_hit:.1f} {unit}, {b_hit / 1e6:.3f} MB sent" if t_hit is not None
                        else "not reached") + " |")
    ing = prepared.get("ingest")
    if ing:
        lines.append("| edge ingest | " + ", ".join(f"{k} {v:g}" for k, v in sorted(ing.items())) + " |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]

    stale = staleness_values(records)
    lines += ["", "## Staleness", ""]
    if stale:
        lines += [f"![staleness]({_staleness_hist(stale, out)})", "",
                  f"{len(stale)} accepted updates; mean staleness {np.mean(stale):.2f}, max {max(stale)}."]
    else:
        lines.append("The server reported no staleness values.")

    rej = rejections(records)
    lines += ["", "## Rejected updates", ""]
    if rej:
        lines += [f"![rejected]({_bar({k: float(v) for k, v in rej.items()}, out, 'rejected.png', title='rejected updates', ylabel='updates')})",
                  "", ", ".join(f"{k}: {v}" for k, v in rej.items()) + f" (total {sum(rej.values())})."]
    else:
        lines.append("None reported.")

    lines += ["", "## Per-modality accuracy (held-out set): what the base gave, what the federation added", ""]
    per_mod = final_modality_accuracy(out, cfg)
    if not per_mod:
        per_mod = dict(records[-1].modality_accuracy)
    if per_mod:
        base_mod = base_modality_accuracy(cfg)
        lines += [f"![per-modality]({_bar(per_mod, out, 'per_modality.png', title='final model, per modality', ylabel='accuracy')})",
                  "", *gain_lines(base_mod, per_mod)]
        (out / "per_modality.json").write_text(json.dumps(per_mod, indent=1))
        (out / "base_per_modality.json").write_text(json.dumps(base_mod, indent=1))
    else:
        lines.append("Not available (the server saved no final adapters).")
    lines += ["", "Files: `config.toml` (resolved config), `metrics.jsonl`, `tb/` (TensorBoard: `tensorboard --logdir tb`)."]
    (out / REPORT).write_text("\n".join(lines) + "\n")
    return out / REPORT
