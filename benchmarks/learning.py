"""Learning on speakers no device has: federated rows against centralized training, per modality and audio condition.

Protocol (``simulations/scenarios/learning.toml``): devices = training speakers, one per device (non-IID: each
device hears a single voice); test = a held-out device showing images no device has, spoken by English voices no
device hears (``simulations/assets/speech/heldout``). Test subsets, each that device rendered again and ingested by
the edge pipeline (the same images in each):

  clean       no added noise              20dB / 5dB   white noise at that speech-to-noise ratio
  other-lang  German, Spanish and French speakers saying their digit words (audio the model never heard), clean
  missing30   the clean set with one modality masked on 30% of the samples (half the camera, half the microphone)

Rows, on the same model, devices and data in one run; every federated row runs the same ServerApp/ClientApp
through :mod:`fedge.simulations.runner` on Flower's simulation engine:

  centralized          every parameter of the seed's model trained on the pooled data of all devices (upper bound)
  cloud-base           the cloud-pretrained base alone, before any federation
  flower-fedavg        plain Flower FedAvg (``flwr.serverapp.strategy.FedAvg``), random base, as many rounds as sync
  fedge-sync           fedge's synchronous FedAvg mode, random base: the virtual-clock reference
  fedge-async-scratch  fedge asynchronous FedBuff from the random base
  fedge-async-base     fedge asynchronous FedBuff from the cloud-pretrained base (the quickstart's path)

The rows from the random base train every parameter (``train.scope = "full"``); the row from the cloud base
trains the scenario's scope.

The two async rows run for fedge-sync's virtual time (``simulation.time_budget_s``) on the same device profiles.

Last line:
  scratch_vs_central / base_vs_central  fused clean accuracy of the async row from scratch / from the base over
                                        centralized's
  fused_clean image_only audio_only     fedge-async-base on the clean subset
  min_fused_minus_best_single           fedge-async-base: the smallest (fused - better single modality) over clean,
                                        20dB, 5dB and other-lang
  missing30_drop_pts                    fedge-async-base: accuracy points lost from clean (fused) to missing30
  time_to_fedavg_final                  virtual time fedge-async-scratch takes to reach fedge-sync's final accuracy
                                        over fedge-sync's virtual time (inf: not reached within it)

Writes ``results.json``, ``table.md`` and ``accuracy_vs_time.png`` into ``--work`` (default ``runs/learning``).

Run: .venv/bin/python benchmarks/learning.py [--quick] [--set key=value ...] [--work DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedge.common.run_log import VersionRecord

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCENARIO = ROOT / "simulations" / "scenarios" / "learning.toml"
CLEAN_DB = 60.0  # "clean": the rendered microphone track still gets white noise, 60 dB below the speech
# (name, voice set of fedge.simulations.avdigits.voice_set, speech-to-noise ratio in dB)
SUBSETS: tuple[tuple[str, str, float], ...] = (
    ("clean", "unseen", CLEAN_DB), ("20dB", "unseen", 20.0), ("5dB", "unseen", 5.0),
    ("other-lang", "other", CLEAN_DB),
)
MISSING = "missing30"
MISSING_FRACTION = 0.3
FUSED, MODS = "image+audio", ("image", "audio")
# --quick: a smoke run (seconds to a minute); asserts only that every part runs
QUICK = ("simulation.devices=3", "data.samples_per_device=6", "data.eval_samples=20", "simulation.cloud_samples=20",
         "simulation.pretrain_steps=5", "aggregation.versions=3", "aggregation.concurrency=2",
         "aggregation.buffer_size=2", "train.local_steps=2", "simulation.fps=4", "simulation.num_cpus=1")
KEYS = ("scratch_vs_central", "base_vs_central", "fused_clean", "image_only", "audio_only",
        "min_fused_minus_best_single", "missing30_drop_pts", "time_to_fedavg_final")


def load(sets: list[str]) -> Any:
    """The scenario with ``sets`` (``key=value``) applied; later settings win."""
    from fedge.common.config import load_config, parse_overrides

    return load_config(toml_path=SCENARIO, overrides=parse_overrides(sets))


def from_scratch(cfg: Any) -> Any:
    """``cfg`` starting from the seed's random base: no cloud pretraining, no named base, every parameter trained.

    Adapters on random encoders can only learn what random features carry, so a federation that starts from
    nothing trains the whole (small) model: ``train.scope = "full"``.
    """
    return dataclasses.replace(cfg, simulation=dataclasses.replace(cfg.simulation, pretrain_steps=0),
                               model=dataclasses.replace(cfg.model, base_path=""),
                               train=dataclasses.replace(cfg.train, scope="full"))


def with_missing(arrays: dict[str, np.ndarray], fraction: float, seed: int) -> dict[str, np.ndarray]:
    """``arrays`` with one modality masked on ``fraction`` of the samples (half lose the image, half the audio)."""
    rng = np.random.default_rng([seed, 30])
    mask = np.asarray(arrays["mask"], dtype=bool).copy()
    rows = rng.permutation(len(mask))[: round(fraction * len(mask))]
    half = len(rows) // 2
    mask[rows[:half], 0] = False  # no camera
    mask[rows[half:], 1] = False  # no microphone
    mask[~mask.any(axis=1)] = np.asarray(arrays["mask"], dtype=bool)[~mask.any(axis=1)]  # never leave a sample empty
    return {**arrays, "mask": mask}


def test_subsets(cfg: Any, cache: Path) -> dict[str, dict[str, np.ndarray]]:
    """The held-out subsets (rendered and ingested once per prepared data set, then reused)."""
    from tqdm import tqdm

    from fedge.common.fsio import atomic_path
    from fedge.simulations.evaluation import load_arrays
    from fedge.simulations.prepare import data_dir_for, heldout_arrays

    folder = data_dir_for(cfg, cache) / "learning-subsets"
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, voices, snr in tqdm(SUBSETS, desc="render+ingest test subsets", unit="subset"):
        path = folder / f"{name}.npz"
        if not path.is_file():
            arrays = heldout_arrays(cfg, folder / name, voices=voices, snr_db=snr)
            with atomic_path(path) as tmp:
                np.savez(tmp, **arrays)
        out[name] = load_arrays(path)
    out[MISSING] = with_missing(out["clean"], MISSING_FRACTION, cfg.seed)
    return out


def centralized(cfg: Any, steps: int) -> Any:
    """Every parameter of the seed's model trained with Adam on the pooled training data of all devices.

    The recipe of the cloud's base pretraining (:mod:`fedge.simulations.pretrain`: learning rate, batch, modality
    dropout), on the devices' data instead of the cloud's share: the upper bound the federation is measured by.
    """
    import torch

    from fedge.common.model import build_model, model_kwargs
    from fedge.common.training import train_steps
    from fedge.edge.data import local_data
    from fedge.edge.node_config import NodeConfig
    from fedge.simulations.pretrain import BATCH_SIZE, MIN_DROPOUT

    n = cfg.simulation.devices
    parts = [local_data(cfg, NodeConfig(partition_id=i, num_partitions=n), "train") for i in range(n)]
    pooled = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    torch.manual_seed(cfg.seed)
    model = build_model(**model_kwargs(cfg))  # type: ignore[arg-type]
    for p in model.parameters():
        p.requires_grad = True
    train_steps(model, pooled, steps=steps, batch_size=BATCH_SIZE, lr=cfg.simulation.pretrain_lr, seed=cfg.seed,
                modality_dropout_p=max(cfg.train.modality_dropout, MIN_DROPOUT))
    model.eval()
    return model


def score(model: Any, subsets: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Per subset: fused / image-only / audio-only accuracy; for missing30 the accuracy over all its samples."""
    from fedge.common.training import evaluate
    from fedge.simulations.evaluation import modality_accuracy

    res = {name: modality_accuracy(model, arrays) for name, arrays in subsets.items() if name != MISSING}
    res[MISSING] = {"all": evaluate(model, subsets[MISSING])["accuracy"]}
    return res


def final_model(run_dir: Path) -> Any:
    """The global model a finished run left: its resolved config's base with the final global state."""
    from fedge.common.config import load_config
    from fedge.simulations.evaluation import ADAPTERS, load_arrays, model_with

    return model_with(load_config(toml_path=run_dir / "config.toml"), load_arrays(run_dir / ADAPTERS))


def reach_time(records: list[VersionRecord], target: float) -> float | None:
    """Virtual time of the first version at or above ``target`` accuracy (None: never)."""
    return next((float(r.virtual_time) for r in records if r.accuracy >= target), None)


def plot(curves: dict[str, list[VersionRecord]], central: float, out: Path) -> Path:
    """Accuracy of each federated row against virtual time (fedge) and against the global version (all rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, recs) in enumerate(curves.items()):
        acc = [r.accuracy for r in recs]
        style = {"marker": "o", "ms": 2, "label": name, "color": f"C{i}"}  # one colour per row in both panels
        if recs and recs[0].virtual_time is not None:
            ax_t.plot([r.virtual_time for r in recs], acc, **style)
        ax_v.plot([r.version for r in recs], acc, **style)
    for ax, xlabel in ((ax_t, "virtual time (s)"), (ax_v, "global version / round")):
        ax.axhline(central, ls="--", c="gray", lw=1, label="centralized")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy, unseen speakers (run's held-out set)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("speaker-split learning: accuracy on speakers no device has")
    fig.tight_layout()
    path = out / "accuracy_vs_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(scores: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one line per row and subset, fused / image-only / audio-only accuracy."""
    lines = ["| row | subset | fused | image only | audio only |", "|---|---|---|---|---|"]

    def f(d: dict[str, float], k: str) -> str:
        return f"{d[k]:.3f}" if k in d else "–"

    for row, per in scores.items():
        for sub, acc in per.items():
            fused = f(acc, "all") + " (all samples)" if sub == MISSING else f(acc, FUSED)
            lines.append(f"| {row} | {sub} | {fused} | {f(acc, 'image')} | {f(acc, 'audio')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes: checks that every part runs, figures mean nothing")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key in every row, e.g. --set train.lr=0.01 (repeatable)")
    ap.add_argument("--sync-rounds", type=int, default=10,
                    help="rounds of fedge-sync and of plain Flower FedAvg; fedge-sync's virtual time is the async "
                         "rows' budget")
    ap.add_argument("--central-steps", type=int, default=600, help="Adam steps of the centralized row")
    ap.add_argument("--work", type=Path, default=None,
                    help="where runs, prepared data and results go (default runs/learning, runs/learning-quick)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.quick:
        args.sync_rounds, args.central_steps = 2, 5
    work = (args.work or ROOT / "runs" / ("learning-quick" if args.quick else "learning")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "data"

    from fedge.common.run_log import read_versions
    from fedge.common.training import evaluate
    from fedge.simulations.evaluation import load_arrays, model_with
    from fedge.simulations.prepare import prepare
    from fedge.simulations.runner import run

    sets = [*(QUICK if args.quick else ()), *args.sets]
    base_cfg = load(sets)
    scratch_cfg = from_scratch(base_cfg)
    sync_cfg = dataclasses.replace(scratch_cfg, aggregation=dataclasses.replace(
        scratch_cfg.aggregation, mode="sync", versions=args.sync_rounds))
    t0 = time.perf_counter()
    prepared = prepare(scratch_cfg, cache)  # the devices' stores and the run's held-out set (unseen speakers)
    subsets = test_subsets(scratch_cfg, cache)
    print(f"data: {scratch_cfg.simulation.devices} devices (one speaker each), test subsets "
          + ", ".join(f"{k} {len(v['label'])}" for k, v in subsets.items()) + f" samples "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    scores: dict[str, dict[str, dict[str, float]]] = {}
    curves: dict[str, list[VersionRecord]] = {}
    t = time.perf_counter()
    central = centralized(prepared, args.central_steps)
    scores["centralized"] = score(central, subsets)
    central_curve = evaluate(central, load_arrays(prepared.data.eval_path))["accuracy"]  # the curves' held-out set
    print(f"centralized: {args.central_steps} steps, clean fused {scores['centralized']['clean'].get(FUSED, 0):.3f} "
          f"({time.perf_counter() - t:.0f} s)", flush=True)

    def federated(name: str, cfg: Any, apps: tuple[Any, Any] | None = None) -> list[VersionRecord]:
        t = time.perf_counter()
        run_dir = run(cfg, out_dir=work / name, cache=cache, report=False, apps=apps)
        recs = read_versions(run_dir)
        if not recs:
            raise RuntimeError(f"{name}: the run produced no global version (see {run_dir})")
        curves[name] = recs
        scores[name] = score(final_model(run_dir), subsets)
        vt = f", virtual {recs[-1].virtual_time:.0f} s" if recs[-1].virtual_time is not None else ""
        print(f"{name}: {len(recs)} versions, final accuracy {recs[-1].accuracy:.3f}{vt} "
              f"({time.perf_counter() - t:.0f} s wall)", flush=True)
        return recs

    from fedge.simulations import flower_baseline

    federated("flower-fedavg", sync_cfg, apps=(flower_baseline.server_app, flower_baseline.client_app))
    sync = federated("fedge-sync", sync_cfg)
    budget = float(sync[-1].virtual_time)

    def within(cfg: Any) -> Any:  # the async rows get fedge-sync's virtual time
        return dataclasses.replace(cfg, simulation=dataclasses.replace(cfg.simulation, time_budget_s=budget))

    scratch = federated("fedge-async-scratch", within(scratch_cfg))
    federated("fedge-async-base", within(base_cfg))
    base_run = json.loads((work / "fedge-async-base" / "config.json").read_text())
    if base_run.get("model.base_path"):
        from fedge.common.config import load_config

        scores["cloud-base"] = score(model_with(load_config(run_config=base_run), None), subsets)

    # metrics
    def fused(row: str, sub: str = "clean") -> float:
        return scores[row][sub].get(FUSED, float("nan"))

    head = scores["fedge-async-base"]
    hit = reach_time(scratch, float(sync[-1].accuracy))
    results = {
        "scratch_vs_central": fused("fedge-async-scratch") / fused("centralized"),
        "base_vs_central": fused("fedge-async-base") / fused("centralized"),
        "fused_clean": fused("fedge-async-base"),
        "image_only": head["clean"].get("image", float("nan")),
        "audio_only": head["clean"].get("audio", float("nan")),
        "min_fused_minus_best_single": min(
            head[s].get(FUSED, float("nan")) - max(head[s].get(m, 0.0) for m in MODS) for s, _, _ in SUBSETS),
        "missing30_drop_pts": 100 * (fused("fedge-async-base") - head[MISSING]["all"]),
        "time_to_fedavg_final": hit / budget if hit is not None and budget > 0 else math.inf,
    }
    md = table(scores)
    png = plot(curves, central_curve, work)
    (work / "table.md").write_text(md + "\n")
    (work / "results.json").write_text(json.dumps({"results": results, "scores": scores, "sets": sets,
                                                   "sync_final_accuracy": sync[-1].accuracy,
                                                   "virtual_budget_s": budget}, indent=1))
    print(md)
    print(f"fedge-sync: final accuracy {sync[-1].accuracy:.3f} at virtual {budget:.0f} s; fedge-async-scratch "
          f"reaches it at {'never' if hit is None else f'{hit:.0f} s'}; plot {png}; "
          f"total {time.perf_counter() - t0:.0f} s wall")
    print(" ".join(f"{k}={results[k]:.3f}" for k in KEYS))


if __name__ == "__main__":
    main()
