"""deploy/monitoring: the Prometheus scrape config and the Grafana dashboard ask only for what fedge exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from fedge.cloud.dashboard import LiveState
from fedge.cloud.prometheus import families
from fedge.common.run_log import VersionRecord

MON = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"


def _exported() -> set[str]:
    live = LiveState(mode="async", buffer_size=2, concurrency=2, target_versions=2)
    live.nodes([1])
    live.accepted_update(1, staleness=1, bytes_up=10)
    live.refused_update(1, "norm")
    live.new_version(1, 1.0, VersionRecord(version=1, accuracy=0.5, modality_accuracy={"image": 0.5}, loss=1.0))
    return {s.name for f in families(live.snapshot()) for s in f.samples}


def test_prometheus_scrapes_the_dashboard_metrics_with_its_token():
    cfg = yaml.safe_load((MON / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"
    assert all(":" in t for sc in job["static_configs"] for t in sc["targets"])


def test_grafana_panels_query_only_exported_metrics():
    dash = json.loads((MON / "grafana-dashboard.json").read_text())
    exported = _exported()
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bfedge_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    assert {"fedge_global_version", "fedge_updates_total", "fedge_devices", "fedge_bytes_total",
            "fedge_accuracy"} <= used
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_compose_publishes_the_dashboard_that_prometheus_scrapes():
    from fedge.common.config import load_config

    docker = MON.parent / "docker"
    cfg = load_config(toml_path=docker / "fedge.toml")
    port = cfg.dashboard.address.rpartition(":")[2]
    cloud = yaml.safe_load((docker / "compose.yaml").read_text())["services"]["cloud"]
    assert f"{port}:{port}" in cloud["ports"] and "FEDGE_DASHBOARD_TOKEN" in cloud["environment"]
    assert cfg.dashboard.tokens_file and not cfg.dashboard.public  # beyond loopback: tokens, never open
    targets = [t for sc in yaml.safe_load((MON / "prometheus.yml").read_text())["scrape_configs"]
               for s in sc["static_configs"] for t in s["targets"]]
    assert f"cloud:{port}" in targets
