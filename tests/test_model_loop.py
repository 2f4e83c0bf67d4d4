"""The cloud-to-device model loop over the network, with real processes and no shared directory.

train (Ray Train inside the aggregator) -> publish (signed store) -> serve (Ray Serve, HTTPS, tokens) -> fetch
(each device's ShardCache) -> train (the devices' updates on the new base are accepted).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import free_port

BIN = Path(sys.executable).parent


def _fill_store(path: Path, modalities: tuple[str, ...], seed: int) -> None:
    """A device's SampleStore with generated camera frames (JPEG) and log-mel windows."""
    import cv2

    from fedge.common.synthetic import make_av_dataset
    from fedge.edge.store import SampleStore

    d = make_av_dataset(60, seed=seed, modalities=modalities)
    rows = []
    for i in range(len(d["label"])):
        img = None
        if d["mask"][i, 0]:
            hwc = (np.clip(d["image"][i].transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
            img = cv2.imencode(".jpg", hwc)[1].tobytes()
        aud = d["audio"][i].astype(np.float32) if d["mask"][i, 1] else None
        rows.append({"image_jpeg": img, "audio": aud, "label": int(d["label"][i]), "quality": (1.0, 1.0),
                     "split": "train" if i % 5 else "test", "device_time": None, "stream_time": None,
                     "source": None})
    with SampleStore(path) as st:
        st.put_many(rows)


@pytest.mark.integration
def test_devices_fetch_each_trained_base_over_https_and_train_on_it_while_the_shard_server_restarts(tmp_path):
    """SuperLink + aggregator with in-loop global training + shard server (HTTPS, tokens) + two `fedge edge run`
    devices (camera+mic, mic-only) with their own stores and caches. The aggregator publishes the start base
    and the trained one into the store only the shard server reads; the devices fetch both over HTTPS (the
    second as deltas), train on them, and their updates are accepted. The devices reach the shard server through a
    relay that holds a response part-way; the shard server is killed while a device is downloading the trained
    base and started again: the download is cut, the device keeps retrying (``shards.retry_s``) and resumes it
    from the restarted server with a Range request, and the federation goes on. Rounds are synchronous, so that
    the run cannot end on the other device's updates alone while the shard server restarts."""
    from fedge.cloud.certs import CertLayout, generate
    from fedge.cloud.serving import add_device_token
    from fedge.common.manifest import generate_keypair
    from fedge.common.synthetic import make_av_dataset
    from tests.deploy.procs import Proc, env_with, flwr_config, port_open, wait_for
    from tests.relay import Relay

    port, shard_port, relay_port = free_port(), free_port(), free_port()
    home = tmp_path / "flwr"
    env = env_with({"FLWR_HOME": str(home)})
    cloud, dev = tmp_path / "cloud", tmp_path / "devices"  # nothing under cloud/ is read by a device
    key, pub = generate_keypair(cloud / "keys")
    certs = CertLayout(cloud / "certs")
    generate(certs.root, nodes=["cam-mic", "mic"])
    flwr_config(home, "fleet", f"127.0.0.1:{port}", certs.ca_cert)
    tokens = cloud / "tokens.json"
    store = cloud / "models"
    store.mkdir(parents=True)
    cloud_data = cloud / "cloud.npz"
    np.savez(cloud_data, **make_av_dataset(120, seed=3))
    # the devices' own copies of what the operator hands them: the pinned key and the CA
    for name, mods in (("cam-mic", ("image", "audio")), ("mic", ("audio",))):
        (dev / name).mkdir(parents=True)
        (dev / name / "manifest.pub").write_bytes(pub.read_bytes())
        (dev / name / "ca.pem").write_bytes(certs.ca_cert.read_bytes())
        _fill_store(dev / name / "store", mods, seed=len(mods))
    procs: list[Proc] = []

    def shard_server(n: int) -> Proc:
        p = Proc([str(BIN / "fedge"), "cloud", "serve", "--store", str(store), "--tokens", str(tokens),
                  "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
                  "--port", str(shard_port), "--num-cpus", "1"], tmp_path / f"shards-{n}.log", env)
        procs.append(p)
        return p

    creds = {name: add_device_token(tokens, name) for name in ("cam-mic", "mic")}

    def agent(name: str, *extra: str) -> Proc:
        cmd = [str(BIN / "fedge"), "edge", "run", "--superlink", f"127.0.0.1:{port}",
               "--store", str(dev / name / "store"), "--root-certificates", str(certs.ca_cert),
               "--auth-keys", str(certs.node_dir(name)), "--device-id", name, "--port", str(free_port()),
               "--grace", "5", "--shards", f"https://127.0.0.1:{relay_port}",
               "--shards-public-key", str(dev / name / "manifest.pub"), "--shards-ca", str(dev / name / "ca.pem"),
               "--shards-cache", str(dev / name / "cache"), *extra]
        p = Proc(cmd, tmp_path / f"agent-{name}.log", {**env, "FEDGE_SHARD_TOKEN": creds[name]})
        procs.append(p)
        return p

    run_id = None
    relay = Relay(relay_port, shard_port)
    try:
        link = Proc([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs.ca_cert),
                     "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
                     "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                     "--host", "127.0.0.1", "--port", str(port), "--database", str(tmp_path / "link.db")],
                    tmp_path / "superlink.log", env)
        procs.append(link)
        server = shard_server(1)
        wait_for(lambda: port_open(port), 60, "the SuperLink", procs)
        for name in ("cam-mic", "mic"):
            r = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(certs.node_public_key(name)),
                                "fleet"], check=False, capture_output=True, text=True, env=env, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
        a, b = agent("cam-mic"), agent("mic", "--modalities", "audio")
        for p in (a, b):
            wait_for(lambda p=p: "SuperNode ID" in p.text(), 90, "a device to connect", procs)
        wait_for(lambda: "serving" in server.text(), 120, "the shard server", procs)

        run_dir = cloud / "run"
        versions = 5
        cfg = {"aggregation.mode": '"sync"', "shards.retry_s": 120.0, "aggregation.versions": versions, "aggregation.buffer_size": 1,
               "aggregation.concurrency": 2, "aggregation.min_nodes": 2, "aggregation.reply_timeout_s": 90.0,
               "aggregation.max_staleness": 20, "train.local_steps": 3, "training.every_versions": 2,
               "training.steps": 5, "training.workers": 1, "training.log_every": 5,
               "training.data_path": f'"{cloud_data}"', "publish.store": f'"{store}"',
               "publish.signing_key": f'"{key}"', "publish.onnx": "false", "run_dir": f'"{run_dir}"'}
        run = Proc([str(BIN / "flwr"), "run", ".", "fleet", "--stream", "--run-config",
                    " ".join(f"{k}={v}" for k, v in cfg.items())], tmp_path / "flwr-run.log", env)
        procs.append(run)
        events_file = run_dir / "events.jsonl"

        def events() -> list[dict]:
            return [json.loads(x) for x in events_file.read_text().splitlines()] if events_file.exists() else []

        def published(name: str) -> bool:
            return any(e["event"] == "published" and e["model"] == name for e in events())

        wait_for(lambda: "global training on version" in run.text() or run.p.poll() is not None, 300,
                 "global training", procs)
        # from here a response past 48 KiB stops part-way: of the trained base's deltas only the image encoder's
        # (~100 KB) is that large, so the cut lands inside a shard, not between two
        relay.hold_after = 48 * 1024
        wait_for(lambda: published("base-000002") or run.p.poll() is not None, 300, "the trained base", procs)
        run_id = run.text().split("Successfully started run ")[1].split()[0]
        wait_for(lambda: relay.held.is_set() or run.p.poll() is not None, 300,
                 "a device in the middle of downloading the trained base", procs)
        os.killpg(server.pid, signal.SIGKILL)  # the shard server dies in the middle of a download
        server.p.wait(timeout=10)
        relay.cut()
        server = shard_server(2)
        wait_for(lambda: run.p.poll() is not None, 400, "the run to finish", procs)
        assert run.p.returncode == 0, run.text()[-3000:]

        ev = events()
        (gt,) = [e for e in ev if e["event"] == "global_training"]
        assert gt["base_version"] == 2 and gt["base"] == "base-000002"
        pub_new = next(e for e in ev if e["event"] == "published" and e["model"] == "base-000002")
        assert pub_new["deltas"] > 0 and pub_new["delta_bytes"] < 0.3 * pub_new["training_bytes"]
        recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["version"] for r in recs] == list(range(1, versions + 1))
        after = [r for r in recs if r["version"] > gt["version"]]
        assert sum(r["updates"] for r in after) >= 2, recs  # updates trained on the new base were accepted
        for name, mods in (("cam-mic", "image+audio"), ("mic", "audio")):
            cache = dev / name / "cache"
            assert (cache / "bases" / f"base-000002.{mods}.safetensors").is_file(), name
            assert any(p.suffix == ".delta" for p in (cache / "shards").iterdir()), name  # delivered as deltas
        assert not any((dev / "mic" / "cache" / "shards").glob("*encoder.image*"))
        assert "serving" in server.text()
        assert "download cut at" in a.text() + b.text()  # the cut download was kept ...
        assert " 206 " in server.text()  # ... and resumed from the restarted server with a Range request
    finally:
        relay.close()
        if run_id is not None and any(p.alive() for p in procs[:1]):
            subprocess.run([str(BIN / "flwr"), "stop", run_id, "fleet"], check=False, capture_output=True,
                           env=env, timeout=60)
        for p in reversed(procs):
            p.stop()
