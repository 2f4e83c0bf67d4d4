"""Model delivery: what a device downloads for a new base, and how soon every device trains on it.

On loopback: a real Ray Serve ShardServer over HTTPS with device tokens; the seed's base published (signed, ONNX
and training shards) and fetched by three devices with their own caches (two with camera and microphone, one
mic-only); then a real global training run (Ray Train, ``training.steps`` steps on generated cloud data), its
base published with deltas against the last one, and the devices fetch it and take a local training step.

Peers in the same run: the full fp32 base (every training shard whole), which a device without the previous
base, or with deltas off, downloads.

    base_update_bytes_fraction     bytes a camera+mic device downloads for the new base / the full fp32 base
    mic_only_update_bytes_fraction the same for the mic-only device (it needs no image encoder)
    seconds_to_all_devices         end of training -> published -> every device has fetched it and trained a step

Run: .venv/bin/python benchmarks/model_delivery.py [--quick]
Last line: base_update_bytes_fraction=... mic_only_update_bytes_fraction=... seconds_to_all_devices=...
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

DEVICES = (("cam-mic-1", ("image", "audio")), ("cam-mic-2", ("image", "audio")), ("mic-only", ("audio",)))


def _device_round(source: Any, version: str, mods: tuple[str, ...], out: Path, cfg: Any) -> dict[str, Any]:
    """Fetch ``version`` and take one local training step on it, as the ClientApp does."""
    import dataclasses

    from fedge.common.base_weights import load_base_file
    from fedge.common.lora import apply_lora, base_state
    from fedge.common.model import build_model, model_kwargs
    from fedge.common.scope import set_trainable
    from fedge.common.synthetic import make_av_dataset
    from fedge.common.training import train_steps
    from fedge.edge.base_fetch import fetch_base

    kw = {**model_kwargs(cfg), "precision": None}
    rep = fetch_base(source, version, mods, out, fill=lambda: base_state(build_model(**kw)))
    model = apply_lora(build_model(**kw), rank=cfg.model.lora_rank, alpha=cfg.model.lora_alpha)
    load_base_file(model, rep.path)
    set_trainable(model, cfg.train.scope)
    data = make_av_dataset(32, seed=1, modalities=mods)
    train_steps(model, data, steps=1, batch_size=16, lr=cfg.train.lr)
    return dataclasses.asdict(rep) | {"done": time.monotonic()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short global training (20 steps instead of 200)")
    ap.add_argument("--steps", type=int, default=0, help="global training steps (default 200, 20 with --quick)")
    args = ap.parse_args()
    steps = args.steps or (20 if args.quick else 200)

    import ray
    import torch

    from fedge.cloud.certs import generate
    from fedge.cloud.publisher import BasePublisher, base_version_name, plain_from_state
    from fedge.cloud.serving import add_device_token, start_shard_server
    from fedge.cloud.training import GlobalTrainer, training_dataset
    from fedge.common.config import load_config
    from fedge.common.lora import base_state
    from fedge.common.manifest import generate_keypair
    from fedge.common.model import build_model, model_kwargs
    from fedge.edge.base_fetch import HttpSource

    torch.set_num_threads(1)
    cfg = load_config(overrides={"training.steps": steps, "training.workers": 1, "training.log_every": 10,
                                 "training.samples": 200})
    tmp = Path(tempfile.mkdtemp(prefix="fedge-delivery-"))
    key, pub = generate_keypair(tmp / "keys")
    certs = generate(tmp / "certs").layout
    tokens = tmp / "tokens.json"
    creds = {name: add_device_token(tokens, name) for name, _ in DEVICES}
    publisher = BasePublisher(tmp / "models", key, image_size=cfg.model.image_size,
                              audio_frames=cfg.model.audio_frames)
    kw = {**model_kwargs(cfg), "precision": None}
    t0 = time.monotonic()
    first, _ = publisher.publish(build_model(**kw), version=base_version_name(0))
    print(f"published {first.version}: {first.total_bytes('safetensors')} training bytes, "
          f"{first.total_bytes()} ONNX bytes in {time.monotonic() - t0:.1f} s", flush=True)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with socket.socket() as sock:  # a free loopback port
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = start_shard_server(tmp / "models", host="127.0.0.1", port=port, tokens_file=tokens,
                                 ssl_certfile=certs.server_cert, ssl_keyfile=certs.server_key)
        sources = {name: HttpSource(url, tmp / "devices" / name / "shards", public_key=pub, modalities=mods,
                                    budget_bytes=64 << 20, token=creds[name], device=name, ca_file=certs.ca_cert)
                   for name, mods in DEVICES}
        for name, mods in DEVICES:  # every device holds the current base
            rep = _device_round(sources[name], first.version, mods, tmp / "devices" / name / "bases", cfg)
            print(f"{name}: {first.version} {rep['full']} shards whole, {rep['downloaded_bytes']} bytes", flush=True)

        trainer = GlobalTrainer.from_config(cfg)
        res = trainer.train(base_state(build_model(**kw)), None, training_dataset(cfg), base_version=10)
        t_end = time.monotonic()
        print(f"global training: {res.steps} steps in {res.seconds:.1f} s, loss {res.first_loss():.3f} -> "
              f"{res.last_loss():.3f}", flush=True)
        state = {k: v.detach().cpu().float().numpy() for k, v in res.base_state.items()}
        new, _ = publisher.publish(plain_from_state(state, kw), version=base_version_name(10))
        t_pub = time.monotonic()
        full = new.total_bytes("safetensors")
        print(f"published {new.version} in {t_pub - t_end:.1f} s: {full} training bytes (the full fp32 base), "
              f"{len(new.shards('delta'))} deltas of {new.total_bytes('delta')} bytes", flush=True)
        results: dict[str, dict[str, Any]] = {}
        errors: list[BaseException] = []

        def run(name: str, mods: tuple[str, ...]) -> None:
            try:
                results[name] = _device_round(sources[name], new.version, mods, tmp / "devices" / name / "bases",
                                              cfg)
            except BaseException as e:  # noqa: BLE001  (reported below)
                errors.append(e)

        threads = [threading.Thread(target=run, args=d) for d in DEVICES]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        for name, _ in DEVICES:
            r = results[name]
            print(f"{name}: {new.version} {r['held']} held, {r['from_delta']} from deltas, {r['full']} whole; "
                  f"{r['downloaded_bytes']} bytes ({r['downloaded_bytes'] / full:.3f} of the full base); trained "
                  f"{r['done'] - t_end:.1f} s after the end of training", flush=True)
        base_fraction = max(results[n]["downloaded_bytes"] for n, m in DEVICES if len(m) == 2) / full
        mic_fraction = results["mic-only"]["downloaded_bytes"] / full
        seconds = max(r["done"] for r in results.values()) - t_end
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    print(f"base_update_bytes_fraction={base_fraction:.3f} mic_only_update_bytes_fraction={mic_fraction:.3f} "
          f"seconds_to_all_devices={seconds:.2f}")


if __name__ == "__main__":
    main()
