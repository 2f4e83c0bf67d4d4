"""The loopback rehearsal: docs/deploy.md's laptop section, command for command, on 127.0.0.1.

Certificates; generated streams ingested into two devices' stores; `fedge cloud start` with TLS and SuperNode
authentication; two `fedge edge run` agents (a microphone-only and a camera+microphone device); a few asynchronous
versions; the aggregated model published as signed shards, served over HTTPS and fetched by `fedge edge predict`.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib

import pytest

from tests.conftest import free_port

from .guide import commands, guide_env, run_step
from .procs import ROOT, port_open, wait_for

pytestmark = pytest.mark.integration


def test_guide_has_every_laptop_step():
    for step in ("certs", "streams", "cloud", "devices", "shards", "predict"):
        assert commands(step), step
    assert [c.background for c in commands("cloud")] == [True]
    assert [c.background for c in commands("devices")] == [True, True]


def test_loopback_rehearsal_runs_the_guide_end_to_end(tmp_path):
    work = tmp_path / "rehearsal"
    logs = tmp_path / "logs"
    logs.mkdir()
    ports = {k: str(free_port()) for k in ("SUPERLINK_PORT", "SHARDS_PORT", "EDGE0_PORT", "EDGE1_PORT")}
    env = guide_env(WORK=str(work), FLWR_HOME=str(tmp_path / "flwr"), **ports)
    procs = []
    try:
        run_step("certs", env, ROOT, logs)
        run_step("streams", env, ROOT, logs)
        for dev in ("edge-0", "edge-1"):
            assert (work / dev / "store").is_dir(), dev

        (cloud,) = run_step("cloud", env, ROOT, logs)
        procs.append(cloud)
        wait_for(lambda: port_open(int(ports["SUPERLINK_PORT"])), 180, "the SuperLink", procs)
        edges = run_step("devices", env, ROOT, logs)
        procs += edges

        # the run ends after aggregation.versions versions; fedge cloud start then exits 0
        wait_for(lambda: not cloud.alive(), 540, "three asynchronous versions", procs, every=2.0)
        assert cloud.p.returncode == 0, cloud.text()[-4000:]
        cfg = tomllib.loads((work / "cloud" / "config.toml").read_text())
        assert cfg["aggregation"]["mode"] == "async" and cfg["data"]["source"] == "store"
        recs = [json.loads(line) for line in (work / "cloud" / "metrics.jsonl").read_text().splitlines()]
        assert [r["version"] for r in recs][-1] >= 3
        assert sum(r["updates"] for r in recs) >= 3
        assert (work / "cloud" / "global_adapters.npz").is_file()
        # asynchronous: an update trained on an older version was still applied after newer versions existed
        assert any(s > 0 for r in recs for s in r["staleness"]), recs
        for e in edges:  # both devices connected over TLS with their registered keys, trained and replied
            assert e.alive(), e.text()[-3000:]
            assert "Sending: train message" in e.text(), e.text()[-3000:]
        for e in edges:
            assert e.stop(timeout=40) in (0, -15, 143), e.text()[-3000:]

        (server,) = run_step("shards", env, ROOT, logs)
        procs.append(server)
        wait_for(lambda: port_open(int(ports["SHARDS_PORT"])), 240, "the shard server", procs)
        out = _predict(env, logs)
        windows = re.findall(r"^window (\d+)\b[^:\n]*: class (\d+) \(p=([0-9.]+)\)", out, re.MULTILINE)
        assert windows and [int(w[0]) for w in windows] == list(range(len(windows)))
        assert all(0 <= int(w[1]) < cfg["model"]["num_classes"] for w in windows)
        got, total = map(int, re.search(r"cached (\d+) of (\d+) model bytes", out).groups())
        assert 0 < got < total  # a microphone-only device fetches only its part of the model
    finally:
        for p in reversed(procs):
            p.stop()


def _predict(env, logs) -> str:
    (line,) = commands("predict")
    r = subprocess.run(["bash", "-c", line.line], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    (logs / "predict.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout
