"""The live state and its views: /api/state against its schema, /metrics through Prometheus' parser, the SSE
stream, token rules beyond loopback, live TensorBoard and `fedge status` — on a real server on loopback."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fedge.cloud.dashboard import DashboardError, LiveEvent, LiveState, start_dashboard
from fedge.cloud.dashboard.http import STATIC, preflight
from fedge.cloud.dashboard.tensorboard import LiveTensorBoard, has_events
from fedge.cloud.serving import add_device_token
from fedge.common.run_log import VersionRecord

SCHEMA = json.loads((STATIC / "state.schema.json").read_text())


def _federation() -> LiveState:
    """Three devices, one version, accepted and refused updates (one of them lost)."""
    live = LiveState(mode="async", buffer_size=2, concurrency=3, target_versions=5, clock="virtual")
    live.started(0)
    live.nodes([11, 12, 13], {11: 0, 12: 1, 13: 2})
    for n in (11, 12, 13):
        live.dispatched(n, 0, 1000)
    live.accepted_update(11, staleness=0, bytes_up=300, metrics={"count-image": 5.0, "count-audio": 0.0})
    live.refused_update(12, "nonfinite", metrics={"count-image": 3.0, "count-audio": 3.0})
    live.accepted_update(13, staleness=2, bytes_up=200)
    live.new_version(1, 0.5, VersionRecord(version=1, accuracy=0.5, loss=float("nan"), updates=2,
                                           modality_accuracy={"image": 0.4, "image+audio": 0.6}))
    live.dispatched(12, 1, 1000)
    live.refused_update(12, "timeout", lost=True)
    live.event(LiveEvent.PUBLISHED, base_version=1, path="/x/base-000001.safetensors")
    return live


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


@pytest.fixture()
def served():
    live = _federation()
    server = start_dashboard(live, "127.0.0.1:0", token="")
    yield live, server
    server.stop(grace_s=0.0)


def test_snapshot_counts_updates_devices_and_accuracy_and_matches_its_schema():
    snap = _federation().snapshot()
    jsonschema.validate(snap, SCHEMA)
    fed = snap["federation"]
    assert (fed["version"], fed["accepted"], fed["refused"], fed["buffered"]) == (1, 2, 2, 0)
    assert snap["rejections"] == {"nonfinite": 1, "timeout": 1}
    assert snap["staleness"] == [{"staleness": 0, "count": 1}, {"staleness": 2, "count": 1}]
    assert snap["bytes"] == {"up": 500, "down": 4000}
    rows = {d["id"]: d for d in snap["devices"]}
    assert rows["11"]["modalities"] == ["image"] and rows["12"]["modalities"] == ["audio", "image"]
    assert rows["12"]["state"] == "lost" and rows["12"]["base_version"] == 1 and rows["12"]["last_reason"] == "timeout"
    assert snap["device_states"] == {"training": 0, "idle": 2, "lost": 1}
    v = snap["versions"][-1]
    assert v["accuracy"] == {"fused": 0.5, "image": 0.4, "image+audio": 0.6} and v["loss"] is None  # no NaN in JSON
    assert snap["federation"]["base_version"] == 1 and snap["events"][-1]["kind"] == "published"


def test_64_bit_node_ids_survive_json_for_javascript():
    live = LiveState(mode="async", buffer_size=1, concurrency=1, target_versions=1)
    live.nodes([2**63 - 25])
    assert live.snapshot()["devices"][0]["id"] == "9223372036854775783"


def test_a_node_that_leaves_is_lost_and_idle_again_when_it_returns():
    live = LiveState(mode="sync", buffer_size=2, concurrency=2, target_versions=2)
    live.nodes([1, 2])
    live.nodes([1])
    assert [d["state"] for d in live.snapshot()["devices"]] == ["idle", "lost"]
    live.nodes([1, 2])
    assert live.snapshot()["device_states"]["lost"] == 0


def test_metrics_parse_with_prometheus_parser_and_carry_the_issue_names(served):
    _, server = served
    status, body, headers = _get(server.url + "metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {"fedge_global_version", "fedge_updates", "fedge_staleness", "fedge_devices", "fedge_bytes",
            "fedge_accuracy"} <= set(fams)
    val = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert val[("fedge_global_version", ())] == 1
    assert val[("fedge_updates_total", (("outcome", "refused"), ("reason", "nonfinite")))] == 1
    assert val[("fedge_updates_total", (("outcome", "accepted"), ("reason", "")))] == 2
    assert val[("fedge_staleness_bucket", (("le", "1.0"),))] == 1
    assert val[("fedge_staleness_count", ())] == 2 and val[("fedge_staleness_sum", ())] == 2
    assert val[("fedge_devices", (("state", "lost"),))] == 1
    assert val[("fedge_bytes_total", (("direction", "up"),))] == 500
    assert val[("fedge_accuracy", (("modality", "fused"),))] == 0.5


def test_api_state_and_page_are_served_and_the_event_stream_sends_each_change(served):
    live, server = served
    _, body, _ = _get(server.url + "api/state")
    jsonschema.validate(json.loads(body), SCHEMA)
    assert _get(server.url)[0] == 200 and b"accuracy-chart" in _get(server.url)[1]
    assert _get(server.url + "static/app.js")[0] == 200
    assert _get(server.url + "static/../http.py")[0] == 404
    with urllib.request.urlopen(server.url + "api/events", timeout=5) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        first = json.loads(_next_event(r)["data"])
        live.new_version(2, 1.0)
        second = json.loads(_next_event(r)["data"])
        assert (first["federation"]["version"], second["federation"]["version"]) == (1, 2)
        live.finished()
        assert not json.loads(_next_event(r)["data"])["running"]
        assert _next_event(r)["event"] == "end"


def _next_event(r) -> dict[str, str]:
    ev: dict[str, str] = {}
    while True:
        line = r.readline().decode().rstrip("\n")
        if not line:
            if ev:
                return ev
            continue
        if line.startswith(":"):
            continue
        k, _, v = line.partition(": ")
        ev[k] = v


def test_beyond_loopback_the_dashboard_needs_a_token_or_public(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDGE_DASHBOARD_TOKEN", raising=False)
    with pytest.raises(DashboardError, match="reachable from other machines"):
        preflight("0.0.0.0:0", public=False)
    assert preflight("0.0.0.0:0", public=True).startswith("http://127.0.0.1:")
    with pytest.raises(DashboardError, match=r"\[HOST:\]PORT"):
        preflight("localhost:http", public=False)
    tokens = tmp_path / "tokens.json"
    device_token = add_device_token(tokens, "cam-1")
    server = start_dashboard(_federation(), "0.0.0.0:0", token="s3/cr+t=", tokens_file=tokens)
    try:
        url = f"http://127.0.0.1:{server.port}/"
        for path in ("", "api/state", "metrics", "api/events", "static/app.js"):
            assert _get(url + path)[0] == 401, path
        assert _get(url + "api/state", {"Authorization": "Bearer wrong"})[0] == 401
        assert _get(url + "metrics", {"Authorization": "Bearer s3/cr+t="})[0] == 200
        assert _get(url + "api/state", {"Authorization": f"Bearer {device_token}", "X-Fedge-Device": "cam-1"})[0] == 200
        assert _get(url + "api/state", {"Authorization": f"Bearer {device_token}", "X-Fedge-Device": "cam-2"})[0] == 401
        status, _, headers = _get(url + "?token=s3%2Fcr%2Bt%3D")  # the page's URL sets a cookie for its requests
        assert status == 200 and "HttpOnly" in headers["Set-Cookie"]
        cookie = headers["Set-Cookie"].split(";")[0]
        assert _get(url + "static/app.js", {"Cookie": cookie})[0] == 200
    finally:
        server.stop(grace_s=0.0)


def test_live_tensorboard_writes_scalars_per_version(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    live = LiveState(mode="async", buffer_size=2, concurrency=2, target_versions=3)
    tb = LiveTensorBoard(tmp_path / "tb")
    live.on_version(tb)
    for v in (1, 2):
        live.new_version(v, float(v), VersionRecord(version=v, accuracy=0.1 * v, modality_accuracy={"image": 0.2},
                                                    loss=1.0, rejected={"nonfinite": 1}, mode="async"))
        ea = EventAccumulator(str(tmp_path / "tb"))
        ea.Reload()
        assert [e.step for e in ea.Scalars("accuracy")] == list(range(1, v + 1))  # on disk as the run goes
    assert "acc_image" in ea.Tags()["scalars"] and has_events(tmp_path / "tb")
    tb.close()


def test_fedge_status_prints_the_state_and_json(served):
    import typer
    from typer.testing import CliRunner

    from fedge.cloud.cli.status import status_command

    _, server = served
    app = typer.Typer()
    app.command()(status_command)
    res = CliRunner().invoke(app, ["--url", server.url])
    assert res.exit_code == 0, res.output
    assert "version 1 of 5" in res.output and "nonfinite" in res.output and "12" in res.output
    res = CliRunner().invoke(app, ["--url", server.url, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["federation"]["version"] == 1
    res = CliRunner().invoke(app, ["--url", "http://127.0.0.1:9/"])
    assert res.exit_code == 2 and "cannot reach" in res.output


def test_static_assets_ship_as_package_data():
    import tomllib

    py = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert "dashboard/static/*" in py["tool"]["setuptools"]["package-data"]["fedge.cloud"]
    assert {p.name for p in STATIC.iterdir()} >= {"index.html", "app.js", "app.css", "state.schema.json"}


@pytest.mark.parametrize("group,argv", [("fedge.cloud.cli", ["start", "--run-dir", "{tmp}"]),
                                        ("fedge.simulations.cli", ["run", "--out", "{tmp}"])])
def test_cli_refuses_a_dashboard_beyond_loopback_without_a_token_before_starting_anything(
        group, argv, tmp_path, monkeypatch):
    import importlib

    from typer.testing import CliRunner

    monkeypatch.delenv("FEDGE_DASHBOARD_TOKEN", raising=False)
    app = importlib.import_module(group).app
    args = [a.replace("{tmp}", str(tmp_path / "run")) for a in argv] + ["--dashboard", "0.0.0.0:0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "reachable from other machines" in res.output
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_no_ray_dashboard_link_when_ray_runs_without_its_dashboard(ray_session):
    from fedge.cloud.server_app import ray_dashboard_url

    assert ray_dashboard_url() == ""


def test_device_rows_in_json_carry_every_field_of_the_row():
    from dataclasses import fields

    from fedge.cloud.dashboard.live import DeviceRow

    assert set(DeviceRow(id=1).as_json()) == {f.name for f in fields(DeviceRow)}


def test_the_page_words_every_live_event_kind():
    """The page (static/app.js) has a sentence for each kind the live state emits; a new kind needs one too."""
    js = (Path(__file__).resolve().parents[2] / "cloud" / "dashboard" / "static" / "app.js").read_text()
    for kind in LiveEvent:
        assert f'e.kind === "{kind}"' in js, kind
    live = LiveState(mode="async", buffer_size=1, concurrency=1, target_versions=1, clock="virtual")
    live.event(LiveEvent.PUBLISHED, base_version=3)
    assert live.snapshot()["events"][-1]["kind"] == "published" and live.base_version == 3
