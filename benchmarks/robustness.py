"""Robustness of the aggregator: poisoned devices, hostile payloads, kill -9, restart time — defaults on.

(a) ``poison20_drop_pts`` / ``poison10_drop_pts``: accuracy points lost when 20 % / 10 % of the devices are
    malicious, against the clean run (same seed, data and device profiles; the very ServerApp and ClientApp on
    Flower's simulation engine, one subprocess each, async FedBuff). A malicious device trains honestly, then
    replaces its update, by turns: a sign flip, a sign flip scaled x50, a sign flip claiming 1e12 examples, a sign
    flip claiming a newer base version than it was sent, and Gaussian noise of 10x its honest norm. The malicious
    devices are fast ones (their updates arrive fresh, the worst case). Accuracy is the mean of the last three
    evaluated versions. The peer (``--peer``): the same 20 % run with the relative bounds and the outlier filter
    off (what the defaults buy).
(b) ``hostile_payloads_rejected``: hand-made payloads fed to the real aggregator (:class:`fedge.cloud.state.
    AggregatorState` on the default model's adapters): a header declaring a 2^31-element tensor, garbage, a torn
    payload, a wrong CRC, wrong names, a wrong shape, NaN, Inf, an oversized payload, a negative and a NaN example
    count, an unknown version, a version other than dispatched, a replay. Each must be refused with a counted reason
    and leave the adapters untouched.
(c) ``kills`` / ``accepted_lost``: an aggregator process (the real state class, checkpoints and write-ahead log on
    disk, ``checkpoint_every = 5``) takes updates and acknowledges each on stdout; it is killed with SIGKILL at
    random moments and restarted each time; ``accepted_lost`` sums, over the kills, the acknowledged updates the
    restarted process does not hold.
(d) ``resume_seconds``: the median restart of (c), from process start to the restored state (interpreter, imports,
    checkpoint, log replay) ready to take updates; the slowest one and the restore alone are printed before.

Run: .venv/bin/python benchmarks/robustness.py [--quick] [--peer] [--kills 12] [--seed 0]
Last line: poison20_drop_pts=… poison10_drop_pts=… hostile_payloads_rejected=… kills=… accepted_lost=…
resume_seconds=…
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MALICIOUS_ENV = "FEDGE_BENCH_MALICIOUS"  # comma-separated partition ids (set before Ray starts: workers inherit)
ATTACKS = ("sign_flip", "scaled", "examples_lie", "version_lie", "noise")


# ---------------------------------------------------------------------------------------------- (a) poisoning
def _malicious_app() -> Any:
    """The real edge ClientApp, except that the partitions named in $FEDGE_BENCH_MALICIOUS replace their update."""
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from fedge.common import codec, wire
    from fedge.edge.client_app import app as edge_app

    dense = codec.CodecParams(topk_ratio=1.0, bits=32, error_feedback=False)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = edge_app(msg, context)  # trains honestly, mods included
        pid = int(context.node_config.get("partition-id", -1))
        bad = {int(x) for x in os.environ.get(MALICIOUS_ENV, "").split(",") if x}
        if pid not in bad or reply.has_error():
            return reply
        upd = reply.content[wire.UPDATE]
        base = int(upd[wire.BASE_VERSION])
        delta = codec.decode(upd[wire.DELTA])
        metrics = {k: float(v) for k, v in reply.content[wire.METRICS].items()}
        attack = ATTACKS[(pid + base) % len(ATTACKS)]
        if attack == "noise":
            rng = np.random.default_rng(pid * 7919 + base)
            norm = float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in delta.values())))
            noise = {k: rng.normal(size=v.shape) for k, v in delta.items()}
            nn = float(np.sqrt(sum(np.sum(v ** 2) for v in noise.values()))) or 1.0
            delta = {k: (v * (10 * norm / nn)).astype(np.float32) for k, v in noise.items()}
        else:
            delta = {k: -v * (50.0 if attack == "scaled" else 1.0) for k, v in delta.items()}
        if attack == "examples_lie":
            metrics[wire.NUM_EXAMPLES] = 1e12
        if attack == "version_lie":
            base += 1  # "trained on the newest version": staleness 0, full weight
        return Message(wire.update_content(base_version=base, payload=codec.encode(delta, dense)[0],
                                           metrics=metrics), reply_to=msg)

    return app


def _fast_partitions(cfg: Any, n: int) -> list[int]:
    from fedge.cloud.clock import device_profile

    p = cfg.profiles
    return [i for i in range(n) if not device_profile(
        i, n, seed=cfg.seed, straggler_fraction=p.straggler_fraction, straggler_slowdown_min=p.straggler_slowdown_min,
        straggler_slowdown_max=p.straggler_slowdown_max).straggler]


def _child(run_dir: str, nodes: int, fraction: float, overrides: list[str]) -> None:
    """One simulation (a subprocess: ``run_simulation`` owns and shuts down its Ray)."""
    import dataclasses

    from flwr.simulation import run_simulation

    from fedge.cloud.server_app import app as server_app
    from fedge.common.config import load_config, parse_overrides

    cfg = load_config(overrides=parse_overrides(overrides))
    cfg = dataclasses.replace(cfg, run_dir=str(Path(run_dir).resolve()))
    bad = _fast_partitions(cfg, nodes)[: round(fraction * nodes)]
    os.environ[MALICIOUS_ENV] = ",".join(map(str, bad))
    os.environ["FEDGE_RUN_CONFIG"] = str(cfg.save(cfg.run_dir))
    run_simulation(server_app=server_app, client_app=_malicious_app(), num_supernodes=nodes,
                   backend_config={"client_resources": {"num_cpus": 1},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})


def _eval_set(path: Path, seed: int) -> Path:
    """Held-out samples of the synthetic task (a seed no device draws from), as the NPZ ``data.eval_path`` reads."""
    from fedge.common.config import load_config
    from fedge.common.synthetic import make_av_dataset

    if not path.is_file():
        m = load_config().model
        data = make_av_dataset(400, seed=seed * 100_003 + 99_991, num_classes=m.num_classes,
                               image_size=m.image_size, n_mels=m.n_mels, frames=m.audio_frames)
        np.savez(path, **data)
    return path


def _federation(name: str, fraction: float, run_dir: Path, args: argparse.Namespace,
                extra: tuple[str, ...] = ()) -> float:
    held = _eval_set(run_dir.parent / "eval.npz", args.seed)
    sets = [
        "data.source=\"synthetic\"", f"data.samples_per_device={args.samples}", f"data.eval_path=\"{held}\"",
        f"seed={args.seed}", f"train.local_steps={args.local_steps}", "aggregation.mode=\"async\"",
        f"aggregation.versions={args.versions}", f"aggregation.buffer_size={args.k}",
        f"aggregation.concurrency={args.devices}", "aggregation.max_staleness=8",
        "fault_tolerance.checkpoint_every=1000", *extra,
    ]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--child", str(run_dir), str(args.devices), str(fraction), *sets],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    from fedge.common.run_log import read_versions

    recs = read_versions(run_dir)
    acc = float(np.mean([x.accuracy for x in recs[-3:]]))
    rej = recs[-1].rejected or {}
    print(f"{name:>22s}: {len(recs)} versions, accuracy (last 3) {acc:.3f}, refused {rej} "
          f"({time.perf_counter() - t0:.0f}s wall)", flush=True)
    return acc


# ---------------------------------------------------------------------------------------------- (b) hostile payloads
def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def hostile_payloads(reference: dict[str, np.ndarray]) -> list[tuple[str, dict[str, Any]]]:
    """(name, RawUpdate fields + dispatched version) of each hostile update, built against ``reference``."""
    from fedge.common import codec, wire

    dense = codec.CodecParams(topk_ratio=1.0, bits=32, error_feedback=False)
    rng = np.random.default_rng(0)
    honest = {k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in reference.items()}
    good = codec.encode(honest, dense)[0]
    first = min(reference)
    header = {"bits": 8, "n": 1 << 31, "k": 0, "idx_len": 0, "val_len": 0,
              "tensors": [[first, [1 << 31], "float32", 0, 1.0]]}
    h = zlib.compress(json.dumps(header).encode(), 9)
    bomb = _recrc(codec.MAGIC + struct.pack("<BI", codec.FORMAT_VERSION, len(h)) + h)

    def poisoned(value: float) -> bytes:
        body = bytearray(good[:-4])
        struct.pack_into("<f", body, len(body) - 4, value)  # the last value of the last tensor
        return _recrc(bytes(body))

    n = {wire.NUM_EXAMPLES: 10.0}

    def case(payload: bytes, base: int = 0, metrics: dict[str, float] | None = None,
             dispatched: int | None = None) -> dict[str, Any]:
        return {"payload": payload, "base_version": base, "metrics": n if metrics is None else metrics,
                "dispatched": dispatched}

    def other(scale: float) -> bytes:  # an honest-looking update that is no replay of ``good``
        return codec.encode({k: v * scale for k, v in honest.items()}, dense)[0]

    return [
        ("header_bomb", case(bomb)),
        ("garbage", case(bytes(rng.integers(0, 256, 3000, dtype=np.uint8)))),
        ("torn", case(good[: len(good) // 2])),
        ("bad_crc", case(good[:-1] + bytes([good[-1] ^ 1]))),
        ("wrong_names", case(codec.encode({f"x{k}": v for k, v in honest.items()}, dense)[0])),
        ("wrong_shape", case(codec.encode({**honest, first: np.zeros(honest[first].size + 1, np.float32)},
                                          dense)[0])),
        ("nan", case(poisoned(float("nan")))),
        ("inf", case(poisoned(float("inf")))),
        ("oversized", case(good + bytes(20 * sum(v.size for v in reference.values())))),
        ("negative_examples", case(other(1.01), metrics={wire.NUM_EXAMPLES: -5.0})),
        ("nan_examples", case(other(1.02), metrics={wire.NUM_EXAMPLES: float("nan")})),
        ("unknown_version", case(other(1.03), base=7)),
        ("version_lie", case(other(1.04), dispatched=-1)),
        ("replay", case(good)),
    ]


def _hostile(args: argparse.Namespace) -> tuple[int, int]:
    from fedge.cloud.builders import global_model
    from fedge.cloud.state import AggregatorState
    from fedge.cloud.validation import RawUpdate
    from fedge.common.config import load_config
    from fedge.common.lora import adapter_state

    initial = {k: v.numpy() for k, v in adapter_state(global_model(load_config())).items()}
    st = AggregatorState(initial, buffer_size=4)
    cases = hostile_payloads(initial)
    good = next(c for name, c in cases if name == "replay")
    assert st.submit(RawUpdate(good["payload"], 0, good["metrics"]))["accepted"]  # the original of the replay
    before = {k: v.copy() for k, v in st.params.items()}
    buffered = len(st.buffer)
    refused = 0
    for name, c in cases:
        res = st.submit(RawUpdate(c["payload"], c["base_version"], c["metrics"]), 0.0, c["dispatched"])
        ok = not res["accepted"] and res["reason"]
        refused += bool(ok)
        print(f"  hostile {name:18s} {len(c['payload']):>9d} B -> "
              f"{'refused: ' + res['reason'] if ok else 'ACCEPTED'}", flush=True)
    untouched = len(st.buffer) == buffered and all(np.array_equal(st.params[k], before[k]) for k in before)
    counted = st.stats()["rejected"] == refused
    print(f"hostile payloads: {refused}/{len(cases)} refused, counted {counted}, model and buffer untouched "
          f"{untouched}", flush=True)
    return (refused if untouched and counted else 0), len(cases)


# ---------------------------------------------------------------------------------------------- (c, d) kill -9
def _aggregator_child(ckpt_dir: str, seed: int) -> None:
    """An aggregator process: restore (or start), then take updates, printing each acknowledged count."""
    t0 = float(os.environ.get("FEDGE_BENCH_T0", time.time()))
    from fedge.cloud.state import CHECKPOINT_NAME, AggregatorState
    from fedge.cloud.validation import RawUpdate
    from fedge.common import codec, wire

    shapes = {f"layer{i}.lora_{ab}": (64, 4) if ab == "a" else (4, 64) for i in range(8) for ab in "ab"}
    t_restore = time.time()
    if (Path(ckpt_dir) / CHECKPOINT_NAME).is_file():
        st = AggregatorState.restore(ckpt_dir, checkpoint_every=5)
    else:
        st = AggregatorState({k: np.zeros(s, np.float32) for k, s in shapes.items()}, buffer_size=4,
                             checkpoint_dir=ckpt_dir, checkpoint_every=5)
    print(f"resumed {st.accepted} {time.time() - t0:.3f} {time.time() - t_restore:.3f}", flush=True)
    dense = codec.CodecParams(topk_ratio=1.0, bits=32, error_feedback=False)
    rng = np.random.default_rng([seed, st.accepted])
    while True:
        delta = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in shapes.items()}
        raw = RawUpdate(codec.encode(delta, dense)[0], st.version, {wire.NUM_EXAMPLES: 10.0})
        if st.submit(raw, time.time(), st.version)["accepted"]:
            print(f"ack {st.accepted}", flush=True)


def _kills(args: argparse.Namespace, tmp: Path) -> tuple[int, int, float]:
    ckpt = tmp / "kill-ckpt"
    rnd = random.Random(args.seed)
    lost, acked, resume_s, restore_s = 0, 0, [], []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for i in range(args.kills + 1):
        t_spawn = time.time()
        p = subprocess.Popen([sys.executable, __file__, "--aggregator", str(ckpt), str(args.seed)], cwd=ROOT,
                             env={**env, "FEDGE_BENCH_T0": repr(t_spawn)}, stdout=subprocess.PIPE, bufsize=0)
        assert p.stdout is not None
        fd, pending = p.stdout.fileno(), b""
        while b"\n" not in pending:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise SystemExit(f"aggregator child failed to start (exit {p.wait()})")
            pending += chunk
        first, pending = pending.split(b"\n", 1)
        held, seconds, restore = int(first.split()[1]), float(first.split()[2]), float(first.split()[3])
        if i:
            lost += max(0, acked - held)
            resume_s.append(seconds)
            restore_s.append(restore)
            print(f"  kill {i:2d}: {acked} acknowledged before, {held} held after, resumed in {seconds:.2f} s "
                  f"(restore and log replay {restore:.3f} s)", flush=True)
        acked = held
        if i == args.kills:
            p.kill()
            p.wait()
            break
        deadline = time.monotonic() + rnd.uniform(0.2, 1.5)  # a random moment: mid-write, mid-checkpoint, ...
        os.set_blocking(fd, False)
        while True:
            done = time.monotonic() >= deadline
            if done:
                os.kill(p.pid, 9)
                p.wait()
            try:  # after the kill too: what it acknowledged before dying is still in the pipe
                while chunk := os.read(fd, 65536):
                    pending += chunk
            except BlockingIOError:
                pass
            *lines, pending = pending.split(b"\n")
            acked = max([acked, *(int(x.split()[1]) for x in lines if x.startswith(b"ack "))])
            if done:
                break
            time.sleep(0.005)
        p.stdout.close()
    print(f"restart to resumed: median {np.median(resume_s):.2f} s, max {max(resume_s):.2f} s (process start: "
          f"interpreter, imports, restore); restore and log replay alone: median {np.median(restore_s):.3f} s",
          flush=True)
    return args.kills, lost, float(np.median(resume_s))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--aggregator":
        _aggregator_child(sys.argv[2], int(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="12 versions per federated run, 10 kills")
    p.add_argument("--peer", action="store_true", help="also the 20 %% run with the relative bounds off")
    p.add_argument("--devices", type=int, default=10, help="virtual devices (all training at once)")
    p.add_argument("--k", type=int, default=4, help="FedBuff buffer size K")
    p.add_argument("--versions", type=int, default=24, help="global versions per federated run")
    p.add_argument("--local-steps", type=int, default=10, help="local steps per update")
    p.add_argument("--samples", type=int, default=100, help="samples per device")
    p.add_argument("--kills", type=int, default=12, help="SIGKILLs of the aggregator process (>= 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the federation and of the kill moments")
    p.add_argument("--timeout", type=int, default=900, help="seconds per federated run")
    p.add_argument("--work", default="", help="keep runs in this directory (default: a temporary one)")
    args = p.parse_args()
    if args.quick:
        args.versions, args.kills = min(args.versions, 12), 10
    with tempfile.TemporaryDirectory(prefix="fedge-bench-robust-") as tmp_s:
        tmp = Path(args.work or tmp_s)
        tmp.mkdir(parents=True, exist_ok=True)
        rejected, total = _hostile(args)
        kills, lost, resume_s = _kills(args, tmp)
        clean = _federation("clean", 0.0, tmp / "clean", args)
        p10 = _federation("10% malicious", 0.1, tmp / "p10", args)
        p20 = _federation("20% malicious", 0.2, tmp / "p20", args)
        if args.peer:
            off = _federation("20% malicious, no bounds", 0.2, tmp / "p20-off", args,
                              ("aggregation.norm_factor=0.0", "aggregation.examples_factor=0.0",
                               "aggregation.outlier_threshold=0.0"))
            print(f"peer (relative bounds off): 20% malicious drop {100 * (clean - off):.1f} pts", flush=True)
    print(f"poison20_drop_pts={100 * (clean - p20):.1f} poison10_drop_pts={100 * (clean - p10):.1f} "
          f"hostile_payloads_rejected={rejected}/{total} kills={kills} accepted_lost={lost} "
          f"resume_seconds={resume_s:.2f}")


if __name__ == "__main__":
    main()
