"""The device agent: supervision of real child processes, argument checks, SIGTERM; real SuperLink runs below."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fedge.common.config import ConfigError
from fedge.edge.agent import (
    AgentError,
    Child,
    auth_key_path,
    build_agent,
    child_env,
    parse_address,
    supernode_command,
)
from fedge.edge.node_config import NodeConfig
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _wait(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_failing_child_is_restarted_with_growing_backoff(tmp_path):
    c = Child("flaky", [sys.executable, "-c", "raise SystemExit(3)"], child_env(), min_backoff_s=0.2,
              max_backoff_s=0.4)
    t0 = time.monotonic()
    while c.starts < 3 and time.monotonic() - t0 < 20:
        c.poll(time.monotonic())
        time.sleep(0.05)
    assert c.starts == 3
    assert c._backoff == pytest.approx(0.4)  # 0.2, then doubled, capped
    c.stop(1.0)


def test_finished_on_failure_child_is_not_restarted_and_stop_ends_the_whole_group(tmp_path):
    done = Child("ingest", [sys.executable, "-c", "pass"], child_env(), restart="on-failure")
    done.poll(time.monotonic())
    _wait(lambda: done.proc.poll() is not None, 20, "the child to finish")
    done.poll(time.monotonic())
    assert done.done and done.starts == 1
    # a child that spawns a grandchild: stop() ends both (the group), by SIGTERM
    pidfile = tmp_path / "grandchild.pid"
    code = (f"import subprocess,sys,time; p=subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']);"
            f"open({str(pidfile)!r},'w').write(str(p.pid)); time.sleep(60)")
    c = Child("supernode", [sys.executable, "-c", code], child_env())
    c.poll(time.monotonic())
    _wait(lambda: pidfile.exists() and pidfile.read_text(), 20, "the grandchild")
    grandchild = int(pidfile.read_text())
    assert c.stop(5.0) == -signal.SIGTERM
    _wait(lambda: not _alive(grandchild), 10, "the grandchild to end")


def test_supernode_command_carries_tls_auth_and_node_config(tmp_path):
    node = NodeConfig(device_id="mic-1", store=str(tmp_path), modalities=("audio",))
    cmd = supernode_command(superlink="10.0.0.1:9092", node=node, port=9111)
    assert cmd[0].endswith("flower-supernode") and "--insecure" in cmd
    assert cmd[cmd.index("--node-config") + 1] == f'device-id="mic-1" store="{tmp_path}" modalities="audio" ' \
                                                  'profile="auto" threads=1'
    ca, key = tmp_path / "ca.crt", tmp_path / "auth.key"
    cmd = supernode_command(superlink="h:1", node=node, port=1, root_certificates=ca, auth_key=key)
    assert "--insecure" not in cmd
    assert cmd[cmd.index("--root-certificates") + 1] == str(ca)
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(key)


def test_bad_arguments_fail_with_one_line_naming_them(tmp_path):
    with pytest.raises(AgentError, match="--superlink 'nohost'"):
        parse_address("nohost")
    with pytest.raises(AgentError, match="--superlink"):
        parse_address("h:99999")
    with pytest.raises(AgentError, match="--root-certificates"):
        build_agent(superlink="h:1", store=tmp_path / "s", root_certificates=tmp_path / "none.pem")
    (tmp_path / "keys").mkdir()
    with pytest.raises(AgentError, match="holds no auth.key"):
        auth_key_path(tmp_path / "keys")
    (tmp_path / "keys" / "auth.key").write_text("k")
    assert auth_key_path(tmp_path / "keys") == tmp_path / "keys" / "auth.key"
    with pytest.raises(AgentError, match="needs --root-certificates"):
        build_agent(superlink="h:1", store=tmp_path / "s", auth_keys=tmp_path / "keys")
    with pytest.raises(ConfigError, match="'modalities'"):
        build_agent(superlink="h:1", store=tmp_path / "s", modalities=("smell",))
    r = subprocess.run([str(BIN / "fedge"), "edge", "run", "--superlink", "h:1", "--store", str(tmp_path / "s"),
                        "--profile", "tpu"], check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    want = "fedge edge run: node config key 'profile': must be one of ('auto', 'cpu', 'gpu'), got 'tpu'"
    assert r.stderr.strip().splitlines() == [want]


def test_modalities_default_to_the_sources_given(tmp_path):
    a = build_agent(superlink="h:1", store=tmp_path / "s", audio="mic.wav")
    sn = next(c for c in a.children if c.name == "supernode")
    assert 'modalities="audio"' in sn.argv[sn.argv.index("--node-config") + 1]
    assert [c.name for c in a.children] == ["ingest", "supernode"]
    ing = a.children[0].argv
    assert ing[ing.index("--audio") + 1] == "mic.wav" and "--video" not in ing
    assert a.children[0].restart == "always"  # not a file here: a live source is reopened when it ends
    (tmp_path / "rec.wav").write_bytes(b"RIFF")
    rec = build_agent(superlink="h:1", store=tmp_path / "s", audio=str(tmp_path / "rec.wav"))
    assert rec.children[0].restart == "on-failure"  # a recording, once read to its end, is done


@contextlib.contextmanager
def _agent(tmp_path: Path, *extra: str) -> Iterator[tuple[subprocess.Popen, Path]]:
    """`fedge edge run` against a SuperLink that is not there (its SuperNode keeps retrying); killed at exit."""
    log = tmp_path / "agent.log"
    with open(log, "wb") as fh:
        p = subprocess.Popen([str(BIN / "fedge"), "edge", "run", "--superlink", f"127.0.0.1:{free_port()}",
                              "--port", str(free_port()), *extra],
                             stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                             env={**child_env(), "FLWR_HOME": str(tmp_path / "flwr")})
        try:
            yield p, log
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


def _supernode_pid(log: Path) -> int:
    _wait(lambda: "supernode started (pid" in log.read_text(), 60, "the SuperNode to start")
    return int(log.read_text().split("supernode started (pid ")[1].split(",")[0])


@pytest.mark.integration
def test_sigterm_stops_the_agent_and_its_supernode(tmp_path):
    """`fedge edge run` against a SuperLink that is not there: the SuperNode keeps retrying until SIGTERM."""
    with _agent(tmp_path, "--store", str(tmp_path / "store"), "--grace", "10") as (p, log):
        sn_pid = _supernode_pid(log)
        time.sleep(2.0)
        assert _alive(sn_pid), log.read_text()  # retrying, not crashed
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0, log.read_text()
    text = log.read_text()
    assert "supernode stopped" in text and text.rstrip().endswith(" stopped")
    assert not _alive(sn_pid)
    assert (tmp_path / "store").is_dir()


@pytest.mark.integration
def test_sigterm_mid_ingest_loses_no_stored_sample_and_no_adapter_state(tmp_path):
    """SIGTERM while the agent ingests a long recording: every sample seen stays, the store is intact, the
    device's saved adapter state is untouched."""
    import sqlite3

    from fedge.edge import node_state
    from fedge.edge.store import DB_NAME, SampleStore

    rate = 16000
    rng = np.random.default_rng(0)
    wav = tmp_path / "mic.wav"
    from fedge.simulations.avdigits import write_wav

    write_wav(wav, (0.1 * rng.standard_normal(240 * rate)).astype(np.float32), rate)  # four minutes
    store = tmp_path / "store"
    state = store / "agent-state"
    saved = {"x.lora_A": rng.standard_normal((4, 8)).astype(np.float32)}
    node_state.save_arrays(state / node_state.ADAPTERS_FILE, saved, {"base_version": 7})
    before = (state / node_state.ADAPTERS_FILE).read_bytes()

    def count() -> int:
        if not (store / DB_NAME).exists():
            return 0
        try:
            with sqlite3.connect(f"file:{store / DB_NAME}?mode=ro", uri=True, timeout=5) as c:
                return int(c.execute("SELECT COUNT(*) FROM samples").fetchone()[0])
        except sqlite3.OperationalError:  # the ingest has not created the table yet
            return 0

    with _agent(tmp_path, "--store", str(store), "--audio", str(wav), "--ingest-arg=--mic-stride",
                "--ingest-arg=0.25") as (p, log):
        _wait(lambda: count() >= 20, 120, "the ingest to store samples")
        seen = count()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0, log.read_text()
    text = log.read_text()
    assert "ingest stopped" in text and "ingest finished" not in text  # stopped mid-recording
    with sqlite3.connect(store / DB_NAME) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with SampleStore(store) as st:
        arrays = st.load_arrays(split="train")  # every stored sample decodes
    assert len(arrays["label"]) >= seen
    assert (state / node_state.ADAPTERS_FILE).read_bytes() == before


@pytest.mark.integration
def test_an_agent_killed_hard_takes_its_supernode_along(tmp_path):
    """SIGKILL leaves no orphan SuperNode behind (Linux: the children ask for SIGTERM when the agent dies)."""
    with _agent(tmp_path, "--store", str(tmp_path / "store")) as (p, log):
        sn_pid = _supernode_pid(log)
        p.kill()  # the agent alone, not its group
        p.wait(timeout=10)
        _wait(lambda: not _alive(sn_pid), 30, "the orphaned SuperNode to stop")


# ------------------------------------------------------------------------------------------ real deployment
CLASSES = 2  # two ingest calls per device keep the test lean
RATE = 16000


def _render_stream(out: Path, label: int, shots: int, rng: np.random.Generator, *, camera: bool, mic: bool):
    """A generated recording of one class: camera shots of a dark (0) or a bright (1) card under a moving
    camera, and a microphone hearing a low (0) or a high (1) whistle over noise (AV-digits' kernels)."""
    from fedge.simulations import avdigits

    video = audio = None
    if camera:
        ink = np.full((8, 8), 1.0 if label == 0 else 0.0, np.float32)
        frames = np.concatenate([avdigits.render_shot(ink, 8, size=48, noise=0.03, rng=rng) for _ in range(shots)])
        video = out / f"cam-{label}.avi"
        avdigits.write_video(video, frames, 8.0)
    if mic:
        t = np.arange(int(0.3 * RATE)) / RATE
        hz = (400.0, 2000.0)[label]
        takes = [[np.sin(2 * np.pi * hz * rng.uniform(0.9, 1.1) * t).astype(np.float32) * 0.5 for _ in range(4)]
                 for _ in range(shots)]
        audio = out / f"mic-{label}.wav"
        avdigits.write_wav(audio, avdigits.render_track(takes, rate=RATE, shot_s=1.0, snr_db=10.0, rng=rng), RATE)
    return SimpleNamespace(label=label, video=video, audio=audio)


def _ingest_cli(store: Path, stream, env: dict[str, str]) -> subprocess.Popen:
    cmd = [str(BIN / "fedge"), "edge", "ingest", "--store", str(store), "--label", str(stream.label)]
    cmd += ["--video", str(stream.video)] if stream.video else []
    cmd += ["--audio", str(stream.audio)] if stream.audio else []
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _generate_and_ingest(tmp_path: Path, env: dict[str, str]):
    """Render camera/microphone recordings, fill the device stores with `fedge edge ingest`.

    Returns the stores of the camera+mic device (``a``) and the mic-only device (``b``), the recording the
    camera+mic agent ingests itself while running, and the cloud's held-out set as NPZ.
    """
    from fedge.edge.ingest import ingest
    from fedge.edge.store import SampleStore

    rng = np.random.default_rng(7)
    media = tmp_path / "media"
    for d in ("a", "b", "h"):
        (media / d).mkdir(parents=True)
    a = [_render_stream(media / "a", c, 12, rng, camera=True, mic=True) for c in range(CLASSES)]
    b = [_render_stream(media / "b", c, 12, rng, camera=False, mic=True) for c in range(CLASSES)]
    held = [_render_stream(media / "h", c, 15, rng, camera=True, mic=True) for c in range(CLASSES)]
    store_a, store_b = tmp_path / "store-a", tmp_path / "store-b"
    procs = [_ingest_cli(store_a, a[0], env), *(_ingest_cli(store_b, s, env) for s in b)]
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out[-2000:]
    with SampleStore(tmp_path / "store-h") as st:  # the cloud's held-out set: same ingest, in process
        for s in held:
            ingest(video=s.video, audio=s.audio, store=st, label=s.label)
        arrays = st.load_arrays(split="train")
    assert len(arrays["label"]) >= 20
    np.savez(tmp_path / "heldout.npz", **arrays)
    return store_a, store_b, a[1], tmp_path / "heldout.npz"


@pytest.mark.integration
@pytest.mark.timeout(1200)  # five processes and a Ray: slow when the other test worker runs a federation too
def test_devices_train_over_tls_with_node_auth_and_a_killed_supernode_rejoins(tmp_path):
    """Real SuperLink (TLS + node auth), two `fedge edge run` devices, the async ServerApp via `flwr run`.

    A camera+mic device and a mic-only device, their stores filled by `fedge edge ingest` from generated
    video and audio; an unregistered device is refused; the mic-only device is killed mid-training (SuperNode
    and agent, SIGKILL), the server carries on, and the device rejoins when its agent is started again.
    """
    import json

    from fedge.cloud.certs import CertLayout, generate
    from fedge.common import codec
    from fedge.edge import node_state
    from tests.deploy.procs import Proc, env_with, flwr_config, port_open, wait_for

    port = free_port()
    home = tmp_path / "flwr"
    env = env_with({"FLWR_HOME": str(home)})
    store_a, store_b, live_stream, heldout = _generate_and_ingest(tmp_path, env)
    certs = CertLayout(tmp_path / "certs")
    generate(certs.root, nodes=["cam-mic", "mic", "stranger"])
    flwr_config(home, "fleet", f"127.0.0.1:{port}", certs.ca_cert)
    procs: list[Proc] = []

    def agent(name: str, store: Path, *extra: str) -> Proc:
        cmd = [str(BIN / "fedge"), "edge", "run", "--superlink", f"127.0.0.1:{port}", "--store", str(store),
               "--root-certificates", str(certs.ca_cert), "--auth-keys", str(certs.node_dir(name)),
               "--device-id", name, "--port", str(free_port()), "--grace", "5", *extra]
        p = Proc(cmd, tmp_path / f"agent-{name}-{len(procs)}.log", env)
        procs.append(p)
        return p

    run_id = None
    try:
        link = Proc([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs.ca_cert),
                     "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
                     "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                     "--host", "127.0.0.1", "--port", str(port), "--database", str(tmp_path / "link.db")],
                    tmp_path / "superlink.log", env)
        procs.append(link)
        wait_for(lambda: port_open(port), 60, "the SuperLink", procs)
        for name in ("cam-mic", "mic"):
            r = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(certs.node_public_key(name)),
                                "fleet"], check=False, capture_output=True, text=True, env=env, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
        # the camera+mic agent keeps ingesting its own sources (the digit-1 recording) while it trains
        a = agent("cam-mic", store_a, "--video", str(live_stream.video), "--audio", str(live_stream.audio),
                  "--ingest-arg=--label", f"--ingest-arg={live_stream.label}")
        b = agent("mic", store_b, "--modalities", "audio")
        stranger = agent("stranger", tmp_path / "store-s")  # valid TLS, its key never registered
        for p in (a, b):
            wait_for(lambda p=p: "SuperNode ID" in p.text(), 90, "a registered device to connect", procs)
        wait_for(lambda: "Failed to activate SuperNode" in stranger.text(), 90, "the stranger's refusal", procs)
        stranger.stop()
        assert "SuperNode ID" not in stranger.text()

        run_dir = tmp_path / "run"
        VERSIONS = 16  # noqa: N806 - long enough that the killed device can rejoin before the run ends
        cfg = {"aggregation.mode": '"async"', "aggregation.versions": VERSIONS, "aggregation.buffer_size": 1,
               "aggregation.concurrency": 2, "aggregation.min_nodes": 2, "aggregation.reply_timeout_s": 30.0,
               "aggregation.max_staleness": 20, "model.num_classes": CLASSES, "train.local_steps": 10,
               "train.lr": 0.01, "data.eval_path": f'"{heldout}"', "run_dir": f'"{run_dir}"'}
        run = Proc([str(BIN / "flwr"), "run", ".", "fleet", "--stream", "--run-config",
                    " ".join(f"{k}={v}" for k, v in cfg.items())], tmp_path / "flwr-run.log", env)
        procs.append(run)
        metrics = run_dir / "metrics.jsonl"

        def versions() -> list[dict]:
            return [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []

        ledger_b = store_b / "agent-state" / node_state.UPDATES_FILE
        wait_for(lambda: len(versions()) >= 1 and ledger_b.exists(), 360, "a first version", procs)
        run_id = run.text().split("Successfully started run ")[1].split()[0]
        # kill the mic-only device hard: its SuperNode (and any ClientApp it runs), then its agent
        sn_pid = int(b.text().rsplit("supernode started (pid ", 1)[1].split(",")[0])
        os.killpg(sn_pid, signal.SIGKILL)
        os.killpg(b.pid, signal.SIGKILL)
        b.p.wait(timeout=10)
        n_at_kill, sent_before = len(versions()), len(node_state.read_jsonl(ledger_b))
        wait_for(lambda: len(versions()) >= n_at_kill + 1, 240, "a version while a device is down", procs)
        t_restart = time.time()
        b2 = agent("mic", store_b, "--modalities", "audio")
        # the restarted device must get back in while the run still goes on (enough versions are left for it:
        # the SuperLink refuses the same identity until the killed session's heartbeat has expired)
        wait_for(lambda: "SuperNode ID" in b2.text() or run.p.poll() is not None, 300, "the device to rejoin", procs)
        wait_for(lambda: run.p.poll() is not None, 500, "the run to finish", procs)
        assert run.p.returncode == 0, run.text()[-3000:]

        hist = versions()
        assert [h["version"] for h in hist] == list(range(1, VERSIONS + 1))
        # the global model improves over the versions: from the initial adapters (version 0) to the last
        from fedge.cloud.builders import global_model
        from fedge.common.config import load_config
        from fedge.common.training import evaluate

        with np.load(heldout) as z:
            v0 = evaluate(global_model(load_config(overrides={"model.num_classes": CLASSES})), dict(z))
        assert hist[-1]["accuracy"] > v0["accuracy"] and hist[-1]["accuracy"] >= 0.9, (v0, hist)
        assert hist[-1]["loss"] < 0.5 * v0["loss"] and hist[-1]["loss"] < hist[0]["loss"], (v0, hist)
        # the server counted the killed device's lost update and carried on without it
        lost = json.loads((run_dir / "summary.json").read_text())["rejections"]
        assert set(lost) & {"node_left", "reply_error", "timeout"}, lost
        # the restarted device rejoined with its registered identity and trained again
        assert "SuperNode ID" in b2.text()
        after = [x for x in node_state.read_jsonl(ledger_b) if x["time"] > t_restart]
        assert after and len(node_state.read_jsonl(ledger_b)) > sent_before, b2.text()[-2000:]
        # the camera+mic agent ingested its own sources into the store it trains from
        assert "ingest finished" in a.text()
        # bytes per update: reported by both devices, at the codec's ratio for deltas of these shapes
        adapters, _ = node_state.load_arrays(store_a / "agent-state" / node_state.ADAPTERS_FILE)
        rng = np.random.default_rng(0)
        probe = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in adapters.items()}
        ratio = len(codec.encode(probe, codec.CodecParams(topk_ratio=0.05))[0]) / codec.raw_nbytes(probe)
        cam = node_state.read_jsonl(store_a / "agent-state" / node_state.UPDATES_FILE)
        mic = node_state.read_jsonl(ledger_b)
        for x in cam + mic:
            assert x["raw-bytes"] == codec.raw_nbytes(adapters)
            assert abs(x["upload-bytes"] / x["raw-bytes"] - ratio) < 0.25 * ratio, (x, ratio)
        assert sum(h["upload_bytes"] for h in hist) > 0
        # a mic-only device trains on audio alone; the camera+mic device on both
        assert all(x["count-image"] == 0 and x["count-audio"] > 0 for x in mic)
        assert all(x["count-image"] > 0 and x["count-audio"] > 0 for x in cam)
    finally:
        if run_id is not None and any(p.alive() for p in procs[:1]):
            subprocess.run([str(BIN / "flwr"), "stop", run_id, "fleet"], check=False, capture_output=True,
                           env=env, timeout=60)
        for p in reversed(procs):
            p.stop()


@pytest.mark.integration
def test_a_device_reconnects_after_the_superlink_comes_back(tmp_path):
    """Network loss: the SuperLink dies and returns on the same address; the running agent reconnects."""
    from tests.deploy.procs import Proc, env_with, port_open, wait_for

    port = free_port()
    env = env_with({"FLWR_HOME": str(tmp_path / "flwr")})

    def superlink(n: int) -> Proc:
        return Proc([str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                     "--host", "127.0.0.1", "--port", str(port), "--database", str(tmp_path / "link.db")],
                    tmp_path / f"superlink-{n}.log", env)

    procs = [superlink(1)]
    try:
        wait_for(lambda: port_open(port), 60, "the SuperLink", procs)
        a = Proc([str(BIN / "fedge"), "edge", "run", "--superlink", f"127.0.0.1:{port}", "--store",
                  str(tmp_path / "store"), "--port", str(free_port())], tmp_path / "agent.log", env)
        procs.append(a)
        wait_for(lambda: "SuperNode ID" in a.text(), 90, "the device to connect", procs)
        procs[0].stop()  # the link goes away...
        wait_for(lambda: "Connection attempt failed" in a.text(), 60, "the device to notice", procs)
        procs.append(superlink(2))  # ...and comes back
        wait_for(lambda: "Connection successful" in a.text() or a.text().count("SuperNode ID") > 1, 120,
                 "the device to reconnect", procs)
        assert a.alive()
    finally:
        for p in reversed(procs):
            p.stop()


def test_microphones_are_restarted_and_image_folders_are_done(tmp_path):
    mic = build_agent(superlink="h:1", store=tmp_path / "s", audio="alsa:hw:1")
    ing = mic.children[0]
    assert ing.argv[ing.argv.index("--audio") + 1] == "alsa:hw:1" and ing.restart == "always"
    assert build_agent(superlink="h:1", store=tmp_path / "s", audio="hw:1").children[0].restart == "always"
    (tmp_path / "photos").mkdir()
    photos = build_agent(superlink="h:1", store=tmp_path / "s", video=str(tmp_path / "photos"))
    assert photos.children[0].restart == "on-failure"  # a folder of photos, once stored, is done
    glob = build_agent(superlink="h:1", store=tmp_path / "s", video=f"{tmp_path}/photos/*.jpg")
    assert glob.children[0].restart == "on-failure"


@pytest.mark.integration
def test_live_microphone_ingest_is_restarted_when_it_ends_and_stops_with_the_agent(tmp_path):
    """A live source (an ffmpeg generator standing in for `--audio alsa:hw:1`) that ends is reopened, not
    treated as a finished recording; SIGTERM stops the agent with what was stored kept."""
    from fedge.edge.store import SampleStore

    store = tmp_path / "store"
    with _agent(tmp_path, "--store", str(store), "--audio", "lavfi:sine=frequency=440:sample_rate=16000",
                "--ingest-arg=--duration", "--ingest-arg=1.5", "--grace", "10") as (p, log):
        _wait(lambda: log.read_text().count("ingest started") >= 2, 90, "the ingest to be restarted")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0, log.read_text()
    text = log.read_text()
    assert "ingest exited with 0" in text and "ingest finished" not in text, text  # ended, then reopened
    assert len(SampleStore(store)) >= 1, text
