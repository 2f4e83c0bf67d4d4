"""deploy/ray/cluster.yaml: Ray's own `ray up` config schema and defaults, and the commands it runs on each node."""

from __future__ import annotations

import copy

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.commands import prepare_config
from ray.autoscaler._private.util import validate_config

from .commands import check_script
from .procs import ROOT

CLUSTER = ROOT / "deploy" / "ray" / "cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_config_passes_rays_validation(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))
    bad = copy.deepcopy(cluster)
    bad["min_worker"] = 2  # a typo is refused by the same check
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_nodes_start_the_venvs_ray_and_the_guide_creates_the_mounted_certificates(cluster):
    cmds = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    programs = [p for c in cmds for p in check_script(c.replace("~/fedge/.venv/bin/", ""))]
    assert programs.count("ray") == 4
    assert any("--head" in c and "--port=6379" in c for c in cluster["head_start_ray_commands"])
    assert all("~/fedge/.venv/bin/ray" in c for c in cmds)  # the pinned Ray, not a system one
    assert cluster["file_mounts"]["~/fedge"] == "."
    assert cluster["file_mounts"]["~/fedge-certs"] == "./certs"
    assert "fedge cloud certs --out certs" in (ROOT / "docs" / "deploy.md").read_text()
    setup = " ".join(cluster["setup_commands"])
    assert "-c constraints.txt" in setup and ".[cloud]" in setup and "torch==2.13.0" in setup
