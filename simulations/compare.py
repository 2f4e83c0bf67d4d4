"""Two settings, same devices and data: run both, plot their accuracy curves in one figure."""

from __future__ import annotations

import json
from pathlib import Path

from fedge.common.config import FedgeConfig
from fedge.common.run_log import read_versions

from .prepare import data_key
from .report import first_reaching, plot_curves, series
from .runner import run

__all__ = ["CompareError", "compare"]


class CompareError(ValueError):
    """The two settings do not describe the same devices and data."""


def compare(a: FedgeConfig, b: FedgeConfig, *, out_dir: str | Path, names: tuple[str, str] = ("A", "B"),
            progress: bool = True) -> Path:
    """Run ``a`` and ``b`` into ``out_dir/a`` and ``out_dir/b``; write ``compare.md`` and the joint plots.

    Raises
    ------
    CompareError
        When a setting that shapes the devices or their data differs (a comparison must hold them fixed).
    """
    ka, kb = data_key(a), data_key(b)
    diff = sorted(k for k in ka if ka[k] != kb[k])
    if diff:
        raise CompareError(f"A and B differ in data settings {diff}: a comparison keeps devices and data fixed")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dirs = [run(cfg, out_dir=out / tag, progress=progress) for cfg, tag in ((a, "a"), (b, "b"))]
    recs = {n: read_versions(d) for n, d in zip(names, dirs)}
    target = max(a.simulation.target_accuracy, b.simulation.target_accuracy)
    plots = plot_curves(recs, out, target=target, title=f"{names[0]} vs {names[1]}")
    rows = ["| run | versions | final accuracy | virtual time (s) | MB sent | "
            + (f"to {target:.2f}: virtual s / MB |" if target else "|"),
            "|---|---|---|---|---|" + ("---|" if target else "")]
    summary = {}
    for n, r in recs.items():
        s = series(r)
        if not len(s["version"]):
            rows.append(f"| {n} | 0 | – | – | – |" + (" – |" if target else ""))
            continue
        t_hit = first_reaching(s["time"], s["accuracy"], target) if target else None
        b_hit = first_reaching(s["bytes"], s["accuracy"], target) if target else None
        summary[n] = {"final_accuracy": float(s["accuracy"][-1]), "virtual_time": float(s["time"][-1]),
                      "bytes_sent": float(s["bytes"][-1]), "time_to_target": t_hit, "bytes_to_target": b_hit}
        hit = (f" {t_hit:.1f} / {b_hit / 1e6:.3f} |" if t_hit is not None and b_hit is not None
               else " not reached |") if target else ""
        rows.append(f"| {n} | {len(r)} | {s['accuracy'][-1]:.4f} | {s['time'][-1]:.1f} | "
                    f"{s['bytes'][-1] / 1e6:.3f} |{hit}")
    (out / "compare.json").write_text(json.dumps(summary, indent=1))
    md = [f"# {names[0]} vs {names[1]}", "", "Same devices and data (one prepared data set).", "", *rows, "",
          *[f"![{p}]({p})" for p in plots], "", f"Runs: `{dirs[0]}`, `{dirs[1]}`."]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    return out / "compare.md"
