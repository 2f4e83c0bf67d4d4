"""Federated simulation on one machine: overhead against plain Flower, scale, async speed-up, accuracy.

Every figure comes from real runs of ``fedge simulate`` (subprocesses: Flower's simulation engine on an embedded
Ray, devices' streams rendered and ingested into stores) in this one program:

(a) ``overhead_vs_flower``: steady-state wall seconds per client update of fedge's sync FedAvg against plain Flower
    FedAvg (``flwr.serverapp.strategy.FedAvg``, :mod:`fedge.simulations.flower_baseline`) on the same model, devices and
    data (target <= 1.15). Steady state: the median round after the first global version, so Ray start-up is
    excluded; the two sides alternate ``--repeats`` times and each keeps its fastest run.
(b) ``devices_1000_seconds``: wall seconds of a whole 1,000-device run (``scenarios/thousand.toml``: render, ingest,
    train), with its peak memory (RSS of the whole process tree) printed beside it.
(c) ``async_speedup``: virtual time to the target accuracy, sync FedAvg over async FedBuff, with 20% of the
    devices 5-10x slower (target >= 3). These two runs start from the seed's base (``simulation.pretrain_steps=0``):
    the cloud-pretrained base is above any target the federated runs can then reach at their first version, so
    time-to-target would only time that first version.
(d) ``fed_vs_central``: final federated accuracy over centralized training of the same adapters (LoRA factors,
    router, fusion gate, modality embeddings) on the pooled device data, from the same starting point: the base the
    cloud pretrained on its curated share (``model.base_path`` of the federated run; target >= 0.95);
    ``missing30_drop_pts``: accuracy points lost when 30% of the devices miss a modality (target <= 3).
(e) ``degraded_vs_best_single``: on a held-out set whose audio is at 5 dB SNR (rendered and ingested like the
    rest), fused accuracy over the better single modality (target >= 1: fusion never below its best input).
(g) ``devices_10000_seconds``, ``devices_10000_peak_gib``: wall seconds and peak memory (RSS of the whole process
    tree) of a whole 10,000-device run (``scenarios/tenthousand.toml``: a shared pool of rendered and ingested
    shots dealt out by partition, 300 devices in flight, stragglers and dropout), from a cold data cache;
    ``scale_seconds_ratio``, ``scale_peak_ratio``: the same scenario at 10,000 over 1,000 devices, each from its
    own cold cache (10 = linear growth; targets: <= 10, and peak memory under 8 GiB).
(f) ``dashboard_overhead``: CPU seconds of the whole simulation (its process tree, Ray included) with the live
    dashboard on (one page's event stream open and ``/metrics`` scraped every second) over the same simulation with
    it off, minus 1 (target < 0.05); the two alternate ``--repeats`` times, medians compared.

Run: .venv/bin/python benchmarks/simulation.py [--quick] [--skip-1000] [--skip-10000] [--repeats N] [--work DIR]
[--only dashboard|scale]
Last line: overhead_vs_flower=… devices_1000_seconds=… async_speedup=… fed_vs_central=… missing30_drop_pts=…
degraded_vs_best_single=… dashboard_overhead=… devices_10000_seconds=… devices_10000_peak_gib=…
scale_seconds_ratio=… scale_peak_ratio=… (with ``--only dashboard``: dashboard_overhead=… alone; with ``--only
scale``: the four scale figures). ``--quick``: a smoke run; (g) then runs 20 against 100 devices on a 60-sample pool.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedge.common.run_log import VersionRecord

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCEN = ROOT / "simulations" / "scenarios"


def _descendants(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _tree_rss(root: int) -> int:
    """Summed resident memory (bytes) of ``root`` and all its descendants, from /proc (Linux)."""
    total = 0
    for pid in _descendants(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def cpu_tree(proc: subprocess.Popen, stop: threading.Event, out: dict[int, float]) -> None:
    """Sample the CPU seconds (user + system) of ``proc`` and each descendant every 0.5 s into ``out[pid]``.

    The sum over ``out`` is the CPU time of the whole simulation, Ray's raylet and workers included (less at most
    the last half second of each process); unlike wall time it barely moves when other programs load the machine.
    """
    tick = os.sysconf("SC_CLK_TCK")
    while not stop.wait(0.5):
        for pid in _descendants(proc.pid):
            try:
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            out[pid] = max(out.get(pid, 0.0), (int(f[11]) + int(f[12])) / tick)


def peak_rss_tree(proc: subprocess.Popen, stop: threading.Event, out: list[float]) -> None:
    """Sample the summed RSS of ``proc`` and all its descendants every 0.5 s; keep the maximum in ``out[0]``.

    Ray's raylet and workers are descendants of the driver, so the whole simulation is counted.
    """
    while not stop.wait(0.5):
        out[0] = max(out[0], float(_tree_rss(proc.pid)))


def cpu_seconds(out: Path) -> float:
    """CPU seconds of a finished :func:`simulate` run (its process tree)."""
    return float(json.loads((out / "bench_wall.json").read_text())["cpu"])


# (a) and (f): synchronous FedAvg, every device in every round, no stragglers (one run serves both)
SYNC_ALL = ["aggregation.versions=10", "aggregation.concurrency=8", "profiles.straggler_fraction=0.0"]
# --quick: every run shrunk to a few devices, samples and versions (appended last, so they win); set in main()
QUICK_SETS: list[str] = []


def simulate(scenario: Path, out: Path, sets: list[str], env: dict[str, str], *, timeout: int = 900,
             extra: list[str] | None = None, attempts: int = 2, shrink: bool = True) -> tuple[float, float]:
    """Run ``fedge simulate`` in a subprocess; return (wall seconds, peak RSS bytes of its process tree).

    A finished run in ``out`` (from an earlier invocation with the same ``--work``) is reused. A failed run is
    retried once: on a heavily loaded machine Ray's node start-up can time out.
    """
    done = out / "bench_wall.json"
    if done.is_file():
        d = json.loads(done.read_text())
        return float(d["wall"]), float(d["peak"])
    cmd = [sys.executable, "-m", "fedge.common.cli", "simulate", *(extra or ["run"]), str(scenario), "--out", str(out),
           "--quiet"]
    for s in [*sets, *(QUICK_SETS if shrink else [])]:
        cmd += ["--set", s]
    for attempt in range(attempts):
        t0 = time.perf_counter()
        with open(out.with_suffix(".log"), "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            peak = [0.0]
            cpu: dict[int, float] = {}
            stop = threading.Event()
            th = threading.Thread(target=peak_rss_tree, args=(proc, stop, peak), daemon=True)
            th.start()
            tc = threading.Thread(target=cpu_tree, args=(proc, stop, cpu), daemon=True)
            tc.start()
            try:
                rc = proc.wait(timeout=timeout)
            finally:
                stop.set()
                th.join()
                tc.join()
                if proc.poll() is None:
                    proc.kill()
        wall = time.perf_counter() - t0
        if rc == 0:
            done.write_text(json.dumps({"wall": wall, "peak": peak[0], "cpu": sum(cpu.values())}))
            return wall, peak[0]
        tail = out.with_suffix(".log").read_text()[-3000:]
        if attempt + 1 == attempts:
            raise RuntimeError(f"fedge simulate {scenario.name} {sets} failed (rc={rc}):\n{tail}")
        print(f"fedge simulate {scenario.name} {sets} failed (rc={rc}), retrying", flush=True)
    raise AssertionError("unreachable")


def metrics(run_dir: Path) -> list[VersionRecord]:
    from fedge.common.run_log import read_versions

    return read_versions(run_dir)


def per_update_seconds(recs: list[VersionRecord]) -> float:
    """Steady-state wall seconds per client update: the median over rounds after the first global version.

    Each round's wall interval divided by the updates it aggregated; the median makes one round slowed by
    another process on a shared machine count for no more than one round.
    """
    if len(recs) < 2 or recs[0].wall_time is None:
        raise RuntimeError("need >= 2 versions with wall_time to time steady state")
    per = [(float(b.wall_time) - float(a.wall_time)) / max(b.updates or 0, 1) for a, b in itertools.pairwise(recs)]
    return float(np.median(per))


def time_to(recs: list[VersionRecord], target: float) -> float | None:
    for r in recs:
        if r.accuracy >= target:
            return float(r.virtual_time)
    return None


def centralized_accuracy(cfg_path: Path, steps: int) -> float:
    """Train the same adapters on the pooled data of every device's store; accuracy on the same held-out set.

    The model starts where the federated run started: the run's base (``model.base_path``, the cloud-pretrained
    base) with the initial adapters; only the adapter state trains, as on devices.
    """
    import torch

    from fedge.common.config import load_config
    from fedge.common.training import evaluate, train_steps
    from fedge.edge.data import local_data
    from fedge.edge.node_config import NodeConfig
    from fedge.simulations.evaluation import load_arrays, model_with

    cfg = load_config(toml_path=cfg_path)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(2)
    n = cfg.simulation.devices
    parts = [local_data(cfg, NodeConfig(partition_id=i, num_partitions=n), "train") for i in range(n)]
    pooled = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    model = model_with(cfg, None)
    train_steps(model, pooled, steps=steps, batch_size=cfg.train.batch_size, lr=cfg.train.lr, seed=cfg.seed,
                modality_dropout_p=cfg.train.modality_dropout)
    return float(evaluate(model, load_arrays(cfg.data.eval_path))["accuracy"])


def degraded_eval(cfg_path: Path, adapters: Path, snr_db: float, cache: Path) -> dict[str, float]:
    """Fused / image-only / audio-only accuracy of the final model on a held-out set with audio at ``snr_db``."""
    import shutil

    from fedge.common.config import load_config
    from fedge.simulations import avdigits, stores
    from fedge.simulations.evaluation import load_arrays, modality_accuracy, model_with

    cfg = load_config(toml_path=cfg_path)
    s, m = cfg.simulation, cfg.model
    plan = avdigits.heldout_plan(cfg.data.eval_samples, seed=cfg.seed)
    work = cache / f"degraded-{snr_db:g}dB"
    shutil.rmtree(work, ignore_errors=True)  # a store appends: start empty
    streams = avdigits.render_device(plan, work / "media", fps=s.fps, shot_s=s.shot_seconds, size=s.frame_size,
                                     image_noise=s.image_noise, snr_db=snr_db, speech=s.speech)
    opts = stores.ingest_options(cfg)
    for st in streams:
        stores.ingest_stream(video=st.video, audio=st.audio, store=work / "store", label=st.label, **opts)
    arrays = stores.store_arrays(work / "store", image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames)
    return modality_accuracy(model_with(cfg, load_arrays(adapters)), arrays)


def _watch(url: str, stop: threading.Event) -> None:
    """What a watcher costs the aggregator: one open event stream (read to the end) and /metrics every second."""
    import urllib.request

    while not stop.is_set():
        try:
            urllib.request.urlopen(url + "api/state", timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)

    def stream() -> None:
        try:
            with urllib.request.urlopen(url + "api/events", timeout=30) as r:
                while not stop.is_set() and r.readline():
                    pass
        except OSError:
            pass

    threading.Thread(target=stream, daemon=True).start()
    while not stop.wait(1.0):
        try:
            urllib.request.urlopen(url + "metrics", timeout=2).read()
        except OSError:
            pass


def live_state_costs(devices: int = 1000, updates: int = 20_000) -> tuple[float, float]:
    """(loop-side microseconds per client update: dispatch + reply events; milliseconds per snapshot as JSON)."""
    from fedge.cloud.dashboard import LiveState

    live = LiveState(mode="async", buffer_size=10, concurrency=100, target_versions=10**6)
    live.nodes(range(devices))
    metrics_ = {"count-image": 10.0, "count-audio": 10.0, "partition-id": 3.0}
    t0 = time.perf_counter()
    for i in range(updates):
        n = i % devices
        live.dispatched(n, i // 10, 20_000)
        live.accepted_update(n, staleness=i % 4, bytes_up=2_000, metrics=metrics_)
        if i % 10 == 9:
            live.new_version(i // 10 + 1, float(i))
    per_update = (time.perf_counter() - t0) / updates
    t0 = time.perf_counter()
    for _ in range(20):
        json.dumps(live.snapshot())
    return per_update * 1e6, (time.perf_counter() - t0) / 20 * 1e3


def dashboard_overhead(work: Path, env: dict[str, str], repeats: int) -> float:
    """(f): CPU seconds of the whole simulation with the dashboard on and watched over the same run off, minus 1.

    CPU time of the process tree (Ray's processes included), not wall time: on a machine that other programs
    load, wall time moves by tens of percent between identical runs; the per-update wall figures are printed too.
    """
    import socket

    sets = SYNC_ALL
    on, off, won, woff = [], [], [], []
    for i in range(repeats):
        sfx = f"-{i}" if i else ""
        # dashboard off: the same settings as (a)'s fedge run, so that run is reused when (a) ran first
        simulate(SCEN / "sync.toml", work / f"fedge-sync{sfx}", sets, env)
        off.append(cpu_seconds(work / f"fedge-sync{sfx}"))
        woff.append(per_update_seconds(metrics(work / f"fedge-sync{sfx}")))
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(f"http://127.0.0.1:{port}/", stop), daemon=True)
        watcher.start()
        try:
            simulate(SCEN / "sync.toml", work / f"dash-on{sfx}", sets, env,
                     extra=["run", "--dashboard", f"127.0.0.1:{port}"])
        finally:
            stop.set()
            watcher.join(timeout=5)
        on.append(cpu_seconds(work / f"dash-on{sfx}"))
        won.append(per_update_seconds(metrics(work / f"dash-on{sfx}")))
    us, ms = live_state_costs()
    print(f"(f) live state: {us:.1f} us of loop time per client update (dispatch + reply events), a 1,000-device "
          f"snapshot as JSON {ms:.1f} ms (a page gets it at most 4 times a second, less often when it costs more)")
    print(f"(f) wall s per client update (load-sensitive): dashboard on {', '.join(f'{x:.4f}' for x in won)}, "
          f"off {', '.join(f'{x:.4f}' for x in woff)}")
    print(f"(f) CPU s of the whole simulation: dashboard on {', '.join(f'{x:.1f}' for x in on)}, "
          f"off {', '.join(f'{x:.1f}' for x in off)}")
    return float(np.median(on) / np.median(off) - 1.0)


def scale(work: Path, env: dict[str, str], *, quick: bool) -> dict[str, float]:
    """(g): the 10,000-device scenario at 1,000 and 10,000 devices, each from its own cold data cache."""
    small, large = (20, 100) if quick else (1000, 10_000)
    tiny = ["simulation.pool_samples=60", "aggregation.versions=2", "aggregation.concurrency=10",
            "aggregation.buffer_size=5", "simulation.pretrain_steps=10", "simulation.cloud_samples=20",
            "data.eval_samples=20"] if quick else []
    runs = {}
    for n in (small, large):
        # each count renders its pool into a cold cache (the quick smoke run shares one: its figures mean nothing)
        cold = {**env, "FEDGE_SIM_CACHE": str(work / ("data-scale" if quick else f"data-scale-{n}"))}
        wall, peak = simulate(SCEN / "tenthousand.toml", work / f"scale-{n}", [f"simulation.devices={n}", *tiny],
                              cold, timeout=3600, shrink=False)
        recs = metrics(work / f"scale-{n}")
        prep = json.loads((work / f"scale-{n}" / "prepared.json").read_text())
        runs[n] = (wall, peak)
        print(f"(g) {n:,} devices: {wall:.0f} s wall (pool render+ingest, cloud share, pretraining, "
              f"{len(recs)} async versions), peak memory {peak / 2**30:.2f} GiB, final acc {recs[-1].accuracy:.3f}, "
              f"pool {prep['pool']['samples']} samples, a sample shared by at most {prep['pool']['reuse']} devices",
              flush=True)
    (ws, ps), (wl, pl) = runs[small], runs[large]
    print(f"(g) {small:,} -> {large:,} devices: wall x{wl / ws:.2f}, peak memory x{pl / ps:.2f} (x10 = linear)")
    return {"devices_10000_seconds": wl, "devices_10000_peak_gib": pl / 2**30, "scale_seconds_ratio": wl / ws,
            "scale_peak_ratio": pl / ps}


SCALE_KEYS = ("devices_10000_seconds", "devices_10000_peak_gib", "scale_seconds_ratio", "scale_peak_ratio")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run of a few minutes: 3 devices, 3 versions, no 1,000-device run, 20 vs 100 "
                         "devices on a 60-sample pool for the scale part (figures not meaningful)")
    ap.add_argument("--skip-1000", action="store_true", help="leave out (b), the 1,000-device run")
    ap.add_argument("--skip-10000", action="store_true", help="leave out (g), the 1,000 and 10,000-device pool runs")
    ap.add_argument("--work", type=Path, default=None, help="keep runs here (default: a temp dir)")
    ap.add_argument("--target", type=float, default=0.4, help="target accuracy for (c)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per side for (a) and (f); each keeps its fastest")
    ap.add_argument("--only", choices=("all", "dashboard", "scale"), default="all",
                    help="dashboard: only (f), the live dashboard's cost; scale: only (g), 1,000 vs 10,000 devices")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fedge-bench-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "data"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FEDGE_SIM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    if args.quick:
        args.repeats, args.skip_1000 = 1, True
        QUICK_SETS.extend(["simulation.devices=3", "data.samples_per_device=20", "data.eval_samples=60",
                           "aggregation.versions=3", "aggregation.concurrency=3", "simulation.pretrain_steps=30",
                           "simulation.cloud_samples=40"])
    if args.only == "dashboard":
        overhead = dashboard_overhead(work, env, args.repeats)
        print(f"runs in {work}")
        print(f"dashboard_overhead={overhead:.3f}")
        return
    if args.only == "scale":
        figures = scale(work, env, quick=args.quick)
        print(f"runs in {work}")
        print(" ".join(f"{k}={figures[k]:.3f}" for k in SCALE_KEYS))
        return
    base = SCEN / "quickstart.toml"
    results: dict[str, object] = {}

    # (c) async vs sync with stragglers, same devices and data, from the seed's base (no pretraining)
    target = args.target
    # from a random base both modes train from scratch: a larger local step than the fine-tuning default
    nopre = ["simulation.pretrain_steps=0", "train.lr=0.01"]
    wall_async, _ = simulate(base, work / "async-seedbase", [f"simulation.target_accuracy={target}", *nopre],
                             env)
    wall_sync, _ = simulate(SCEN / "sync.toml", work / "sync-seedbase",
                            [f"simulation.target_accuracy={target}", "aggregation.versions=15", *nopre], env)
    ra, rs = metrics(work / "async-seedbase"), metrics(work / "sync-seedbase")
    ta, ts = time_to(ra, target), time_to(rs, target)
    print(f"(c) async: final acc {ra[-1].accuracy:.3f}, {target} at {ta} virtual s ({wall_async:.0f} s wall); "
          f"sync: final acc {rs[-1].accuracy:.3f}, {target} at {ts} virtual s ({wall_sync:.0f} s wall)")
    speedup = (ts / ta) if ta and ts else float("nan")
    results["async_speedup"] = speedup

    # (d) federated vs centralized, both from the cloud-pretrained base; 30% of devices missing a modality
    simulate(base, work / "async", [f"simulation.target_accuracy={target}"], env)
    ra = metrics(work / "async")
    print(f"(d) async from the cloud-pretrained base: version 1 acc {ra[0].accuracy:.3f}, final "
          f"{ra[-1].accuracy:.3f}")
    fed = max(r.accuracy for r in ra[-3:])
    steps = sum(r.updates or 0 for r in ra) * 15
    central = centralized_accuracy(work / "async" / "config.toml", steps)
    print(f"(d) federated {fed:.4f} (best of the last 3 versions) vs centralized {central:.4f} ({steps} steps)")
    results["fed_vs_central"] = fed / central
    simulate(base, work / "missing30", ["data.missing_image=0.15", "data.missing_audio=0.15"], env)
    rm = metrics(work / "missing30")
    fed_m = max(r.accuracy for r in rm[-3:])
    print(f"(d) 30% of devices missing a modality: {fed_m:.4f}")
    results["missing30_drop_pts"] = 100 * (fed - fed_m)

    # (e) audio degraded to 5 dB SNR at test time
    acc = degraded_eval(work / "async" / "config.toml", work / "async" / "global_adapters.npz", 5.0, work)
    best = max(acc.get("image", 0.0), acc.get("audio", 0.0))
    print(f"(e) audio at 5 dB SNR: fused {acc.get('image+audio', 0):.4f}, image only {acc.get('image', 0):.4f}, "
          f"audio only {acc.get('audio', 0):.4f}")
    results["degraded_vs_best_single"] = acc["image+audio"] / best

    # (a) fedge sync FedAvg vs plain Flower FedAvg, same model/devices/data, all 8 devices per round;
    # the two alternate (fedge, Flower, fedge, ...) and each keeps its fastest run, so that a burst of load from
    # elsewhere on the machine does not land on one side only
    sets = SYNC_ALL
    pf, pb = [], []
    for i in range(args.repeats):
        sfx = f"-{i}" if i else ""
        simulate(SCEN / "sync.toml", work / f"fedge-sync{sfx}", sets, env)
        simulate(SCEN / "sync.toml", work / f"flower{sfx}", sets, env, extra=["flower-baseline"])
        pf.append(per_update_seconds(metrics(work / f"fedge-sync{sfx}")))
        pb.append(per_update_seconds(metrics(work / f"flower{sfx}")))
    print(f"(a) wall s per client update: fedge {min(pf):.4f} (runs {', '.join(f'{x:.4f}' for x in pf)}), "
          f"plain Flower FedAvg {min(pb):.4f} (runs {', '.join(f'{x:.4f}' for x in pb)})")
    results["overhead_vs_flower"] = min(pf) / min(pb)

    # (b) 1,000 virtual devices
    if args.skip_1000:
        results["devices_1000_seconds"] = float("nan")
    else:
        wall, peak = simulate(SCEN / "thousand.toml", work / "thousand", [], env, timeout=1800)
        r1 = metrics(work / "thousand")
        prep = json.loads((work / "thousand" / "prepared.json").read_text())
        print(f"(b) 1,000 devices: {wall:.0f} s wall (render+ingest+train), peak memory {peak / 2**30:.2f} GiB, "
              f"{len(r1)} versions, final acc {r1[-1].accuracy:.3f}, ingest {prep.get('ingest')}")
        results["devices_1000_seconds"] = wall
        results["devices_1000_peak_gib"] = peak / 2**30

    results["dashboard_overhead"] = dashboard_overhead(work, env, args.repeats)

    # (g) 1,000 and 10,000 devices drawing from a shared pool
    results.update(dict.fromkeys(SCALE_KEYS, float("nan")) if args.skip_10000 else scale(work, env, quick=args.quick))

    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"runs in {work}")
    keys = ("overhead_vs_flower", "devices_1000_seconds", "async_speedup", "fed_vs_central", "missing30_drop_pts",
            "degraded_vs_best_single", "dashboard_overhead", *SCALE_KEYS)
    print(" ".join(f"{k}={float(results[k]):.3f}" for k in keys))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
