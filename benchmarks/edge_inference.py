"""Sharded edge inference: onnxruntime shard chain vs torch eager, and what a mic-only device downloads.

One run: train the MoE briefly on the generated audio-visual task in both expert layouts from the same initial
weights — ``shared`` (any token may use any expert) and ``modality`` (``model.expert_affinity = "modality"``:
image tokens route only to experts 0-1, audio tokens only to 2-3) — publish both as signed shards into a
ModelStore, serve them with the real Ray Serve ShardServer on 127.0.0.1, then

* accuracy: held-out accuracy of each trained layout with both modalities, image only and audio only;
* download: camera-only, mic-only and full devices stream their windows through ``ShardedRunner`` from an empty
  cache; bytes they downloaded / ONNX bytes of the whole model. The shared layout is printed for comparison;
  the modality layout is the deployed configuration that the figures on the last line are measured on;
* latency (deployed layout): per-keyframe (batch 1, image + audio) inference of the full sharded model.
  ``ort_speedup`` compares the same shard chain (``fedge.edge.inference.ShardedRunner``, identical glue) with
  onnxruntime sessions against torch eager modules of the same shards; the monolithic
  ``MultimodalMoE.forward`` in torch eager is printed as a second peer. One thread each, interleaved calls,
  median over many calls.

Last line: ``ort_speedup=… mic_only_bytes_fraction=…`` (deployed = modality layout).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from _quick import parse_quick  # benchmarks/_quick.py: sys.path[0] is this folder

LAYOUTS = ("shared", "modality")
DEPLOYED = "modality"
SUBSETS = {"image+audio": (True, True), "image": (True, False), "audio": (False, True)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accuracy_by_subset(model: Any, test: dict[str, np.ndarray]) -> dict[str, float]:
    """Held-out accuracy with each modality subset present (the same samples, the rest masked out)."""
    from fedge.common.training import evaluate

    out = {}
    for name, keep in SUBSETS.items():
        data = dict(test)
        data["mask"] = np.asarray(test["mask"], bool) & np.array(keep)
        rows = data["mask"].any(axis=1)
        out[name] = evaluate(model, {k: v[rows] for k, v in data.items()})["accuracy"]
    return out


def _downloads(url: str, version: str, pub: Path, test: dict[str, np.ndarray], windows: int, tmp: Path,
               total: int, label: str) -> tuple[dict[str, float], dict[str, Any]]:
    """Camera-only, mic-only and full devices classify ``windows`` windows each from an empty cache."""
    from fedge.edge.inference import ShardedRunner
    from fedge.edge.shards import ShardCache

    fractions: dict[str, float] = {}
    caches: dict[str, Any] = {}
    for name, mods in (("camera", ("image",)), ("mic", ("audio",)), ("full", ("image", "audio"))):
        cache = ShardCache(url, tmp / f"cache-{version}-{name}", public_key=pub, modalities=mods, version=version)
        runner = ShardedRunner(cache)
        used: set[int] = set()
        after: dict[int, int] = {}
        for i in range(windows):  # a stream over all classes: one keyframe / window at a time
            out = runner.predict(image=test["image"][i : i + 1] if "image" in mods else None,
                                 audio=test["audio"][i : i + 1] if "audio" in mods else None)
            used |= set(out.experts[0])
            if i + 1 in (1, 8, windows):
                after[i + 1] = cache.stats.downloaded_bytes
        fractions[name] = cache.stats.downloaded_bytes / total
        caches[name] = cache
        curve = ", ".join(f"{k} windows {v / total:.1%}" for k, v in after.items())
        print(f"[{label}] {name:6s} device: downloaded {cache.stats.downloaded_bytes:7d} of {total} bytes "
              f"({fractions[name]:.1%}); experts used {sorted(used)}; after {curve}")
    return fractions, caches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--windows", type=int, default=64, help="windows each device classifies (download part)")
    ap.add_argument("--iters", type=int, default=300, help="timed calls per runtime (latency part)")
    ap.add_argument("--batch", type=int, default=1, help="samples per call in the latency part")
    ap.add_argument("--seed", type=int, default=0, help="initial weights of both layouts (the same for both)")
    args = parse_quick(ap, train_steps=5, windows=8, iters=20)

    import ray
    from ray import serve

    from fedge.cloud.export import plain_model, shard_modules
    from fedge.cloud.model_store import ModelStore
    from fedge.cloud.serving import start_shard_server
    from fedge.common.manifest import generate_keypair, load_private_key
    from fedge.common.model import build_model
    from fedge.common.synthetic import make_av_dataset
    from fedge.common.training import train_steps
    from fedge.edge.inference import ShardedRunner
    from fedge.edge.shards import ShardCache

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="fedge-bench-edge-"))

    # ---------------------------------------------------------------- trained model versions, both layouts
    data = make_av_dataset(1024, seed=0)
    test = make_av_dataset(256, seed=1)
    priv, pub = generate_keypair(tmp / "keys")
    store = ModelStore(tmp / "store")
    models, manifests = {}, {}
    for layout in LAYOUTS:
        t0 = time.perf_counter()
        model = build_model(seed=args.seed, precision={"image": "fp32", "audio": "fp32"}, expert_affinity=layout)
        train_steps(model, data, steps=args.train_steps, batch_size=32, lr=3e-3, modality_dropout_p=0.3)
        acc = _accuracy_by_subset(model, test)
        accs = ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
        print(f"[{layout}] trained {args.train_steps} steps in {time.perf_counter() - t0:.1f}s: held-out "
              f"accuracy {accs}")
        t0 = time.perf_counter()
        manifests[layout] = store.publish(model, version=layout, private_key=load_private_key(priv),
                                          image_size=32, audio_frames=32)
        models[layout] = model
        print(f"[{layout}] exported {len(manifests[layout].shards())} ONNX shards "
              f"({manifests[layout].total_bytes('onnx')} bytes) in {time.perf_counter() - t0:.1f}s; expert groups "
              f"{manifests[layout].model['expert_groups']}")
    model, manifest = models[DEPLOYED], manifests[DEPLOYED]
    total = manifest.total_bytes("onnx")

    # ---------------------------------------------------------------- downloads through the real ShardServer
    results: dict[str, dict[str, float]] = {}
    caches: dict[str, ShardCache] = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        url = start_shard_server(store.root, port=_free_port())
        for layout in LAYOUTS:
            label = f"{layout}, deployed" if layout == DEPLOYED else f"{layout}, comparison"
            results[layout], c = _downloads(url, layout, pub, test, args.windows, tmp,
                                            manifests[layout].total_bytes("onnx"), label)
            if layout == DEPLOYED:
                caches = c
        # context: mic-only devices that hear only a few classes (Dirichlet(0.5) label mix, non-IID)
        rng = np.random.default_rng(0)
        noniid = []
        for dev in range(8):
            p = rng.dirichlet(np.full(10, 0.5))
            rows = rng.choice(len(test["label"]), size=args.windows, p=p[test["label"]] / p[test["label"]].sum())
            cache = ShardCache(url, tmp / f"cache-mic-{dev}", public_key=pub, modalities=("audio",),
                               version=DEPLOYED)
            runner = ShardedRunner(cache)
            for r in rows:
                runner.predict(audio=test["audio"][r : r + 1])
            noniid.append(cache.stats.downloaded_bytes / total)
        print(f"[{DEPLOYED}, deployed] non-IID mic-only devices (8, Dirichlet 0.5 over classes): downloaded "
              f"fraction mean {np.mean(noniid):.3f} (min {min(noniid):.3f}, max {max(noniid):.3f})")
    finally:
        serve.shutdown()
        ray.shutdown()
    fractions = results[DEPLOYED]
    print(f"shared layout (comparison): mic_only_bytes_fraction={results['shared']['mic']:.3f} "
          f"camera_only_bytes_fraction={results['shared']['camera']:.3f}")

    # ---------------------------------------------------------------- latency, offline from the cache (no Ray)
    plain = plain_model(model)
    runner = ShardedRunner(caches["full"])  # works from the cache: the server is gone
    modules = shard_modules(plain)  # the same shard chain and glue with torch eager modules as sessions
    torch_runner = ShardedRunner(caches["full"],
                                 backend=lambda entry, path: TorchSession(modules[entry.name][0], entry))
    b = args.batch
    img, aud = test["image"], test["audio"]
    with torch.inference_mode():
        want = plain(torch.from_numpy(img[:8]), torch.from_numpy(aud[:8])).logits.numpy()
    got = runner.predict(image=img[:8], audio=aud[:8]).logits
    got_t = torch_runner.predict(image=img[:8], audio=aud[:8]).logits
    print(f"max |logit diff| vs MultimodalMoE.forward on 8 samples: onnxruntime {np.max(np.abs(got - want)):.2e}, "
          f"torch shard chain {np.max(np.abs(got_t - want)):.2e}")

    def mono(x_img: np.ndarray, x_aud: np.ndarray) -> None:
        plain(torch.from_numpy(x_img), torch.from_numpy(x_aud))

    def ort_call(x_img: np.ndarray, x_aud: np.ndarray) -> None:
        runner.predict(image=x_img, audio=x_aud)

    def chain(x_img: np.ndarray, x_aud: np.ndarray) -> None:
        torch_runner.predict(image=x_img, audio=x_aud)

    times: dict[str, list[float]] = {"ort": [], "chain": [], "mono": []}
    fns = {"ort": ort_call, "chain": chain, "mono": mono}
    block = 10  # blocks of calls per runtime, rotated, so background load hits all three alike
    with torch.inference_mode():
        for rnd in range(args.iters // block + 2):
            for key, fn in fns.items():
                for k in range(block):
                    j = ((rnd * block + k) * b) % (len(img) - b)
                    t = time.perf_counter()
                    fn(img[j : j + b], aud[j : j + b])
                    if rnd >= 2:  # warm-up rounds
                        times[key].append(time.perf_counter() - t)
    ort_ms, chain_ms, mono_ms = (statistics.median(times[k]) * 1e3 for k in ("ort", "chain", "mono"))
    print(f"[{DEPLOYED}, deployed] latency per call (batch {b}, image+audio, 1 thread, median of {len(times['ort'])}): onnxruntime "
          f"shards {ort_ms:.3f} ms | torch eager shards {chain_ms:.3f} ms | torch eager MultimodalMoE.forward "
          f"{mono_ms:.3f} ms")
    print(f"speedup vs torch eager MultimodalMoE.forward: {mono_ms / ort_ms:.2f}")
    print(f"deployed layout: expert_affinity={DEPLOYED} camera_only_bytes_fraction={fractions['camera']:.3f} "
          f"full_bytes_fraction={fractions['full']:.3f}")
    print(f"ort_speedup={chain_ms / ort_ms:.2f} mic_only_bytes_fraction={fractions['mic']:.3f}")


class TorchSession:
    """A shard's torch module behind onnxruntime's ``run(None, feeds)`` signature (the eager peer)."""

    def __init__(self, module: torch.nn.Module, entry: object) -> None:
        self.module = module.eval()
        self.names = [t.name for t in entry.inputs]  # type: ignore[attr-defined]

    def run(self, output_names: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = self.module(*(torch.from_numpy(feeds[n]) for n in self.names))
        return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


if __name__ == "__main__":
    main()
