"""deploy/docker: the compose file against the Compose specification's schema, and what it and the images run.

The schema is vendored from the docker-compose 1.29.2 wheel (compose/config/compose_spec.json, Apache-2.0). No image
is built and nothing is started: this machine has the Docker client but no engine (docs/deploy.md says so).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from fedge.common.config import load_config

from .commands import check_container
from .procs import ROOT

DOCKER = ROOT / "deploy" / "docker"
SCHEMA = json.loads((Path(__file__).parent / "schemas" / "compose_spec.json").read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _dockerfile(name: str) -> list[tuple[str, str]]:
    """(instruction, rest) pairs of a Dockerfile, continuation lines joined."""
    text = (DOCKER / name).read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            ins, _, rest = line.partition(" ")
            out.append((ins.upper(), rest.strip()))
    return out


def _entrypoint(dockerfile: str) -> list[str]:
    """The program an image runs its CMD/command with (ENTRYPOINT minus tini)."""
    for ins, rest in _dockerfile(dockerfile):
        if ins == "ENTRYPOINT":
            words = json.loads(rest)
            return words[words.index("--") + 1:] if "--" in words else words
    return []


def _unescape(x):
    """Compose turns $$ into a literal $ before the container sees it."""
    if isinstance(x, str):
        return x.replace("$$", "$")
    if isinstance(x, list):
        return [_unescape(v) for v in x]
    return x


def test_compose_file_matches_the_compose_specification(compose):
    errors = sorted(jsonschema.Draft201909Validator(SCHEMA).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{e.json_path}: {e.message}" for e in errors)
    bad = yaml.safe_load(yaml.safe_dump(compose))
    bad["services"]["edge-0"]["comand"] = ["x"]
    assert list(jsonschema.Draft201909Validator(SCHEMA).iter_errors(bad))  # the schema does catch typos


def test_compose_runs_a_superlink_the_cloud_side_and_two_edge_agents(compose):
    s = compose["services"]
    assert {"superlink", "cloud", "shards", "edge-0", "edge-1"} <= set(s)
    edges = [n for n in s if s[n]["build"]["dockerfile"].endswith("edge.Dockerfile")]
    assert sorted(edges) == ["edge-0", "edge-1"]
    for name, svc in s.items():
        assert (ROOT / svc["build"]["dockerfile"]).is_file(), name
        assert (DOCKER / svc["build"]["context"]).resolve() == ROOT


def test_every_service_command_parses_with_the_real_program(compose):
    seen = set()
    for svc in compose["services"].values():
        prefix = _entrypoint(Path(svc["build"]["dockerfile"]).name)
        seen.update(check_container(prefix + _unescape(svc["command"])))
    assert {"fedge", "flower-superlink", "flower-superexec", "flwr", "ray"} <= seen


def _flags(cmd: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)


def test_names_ports_and_keys_agree_across_services(compose):
    s = compose["services"]
    link = _flags(s["superlink"]["command"])
    port = int(link["port"])
    assert s["superlink"]["ports"] == [f"{port}:{port}"] and link["isolation"] == "process"
    init = _unescape(s["init"]["command"][-1])
    certs = shlex.split(re.search(r"fedge cloud certs [^;]*", init)[0])
    hosts = {certs[i + 1] for i, w in enumerate(certs) if w == "-H"}
    nodes = {certs[i + 1] for i, w in enumerate(certs) if w == "-n"}
    assert f"--runtime-api-address=superlink:{port}" in s["cloud"]["command"][-1]
    assert "superlink" in hosts  # the name every client dials is in the certificate
    for edge in ("edge-0", "edge-1"):
        f = _flags(s[edge]["command"])
        assert f["superlink"] == f"superlink:{port}"
        assert f["auth-keys"] == f"/certs/supernodes/{f['device-id']}" and f["device-id"] in nodes
        assert f["root-certificates"] == "/certs/ca.crt"
        assert "/var/lib/fedge" in [v.split(":")[1] for v in s[edge]["volumes"]]  # the store persists
    shards = _flags(s["shards"]["command"])
    assert s["shards"]["ports"] == [f"{shards['port']}:{shards['port']}"]
    assert _flags(s["edge-1"]["command"])["modalities"] == "audio" and "video" not in _flags(s["edge-1"]["command"])


def test_volumes_and_dependencies_resolve(compose):
    s, named = compose["services"], set(compose["volumes"])
    for name, svc in s.items():
        for dep in svc.get("depends_on", {}):
            assert dep in s, (name, dep)
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (DOCKER / src).exists() or src.startswith("./media/"), (name, v)
            else:
                assert src in named, (name, v)
    assert "deploy/docker/media/edge-0" in (ROOT / "docs" / "deploy.md").read_text()  # the guide says what goes there


def test_the_run_config_the_cloud_mounts_is_a_valid_fedge_config():
    cfg = load_config(toml_path=DOCKER / "fedge.toml")
    assert cfg.aggregation.mode == "async" and cfg.aggregation.min_nodes == 2 and cfg.data.source == "store"


@pytest.mark.parametrize("name, extra, base", [("edge.Dockerfile", "edge", "python:3.11-slim"),
                                               ("cloud.Dockerfile", "cloud", f"rayproject/ray:{ray.__version__}-py311")])
def test_dockerfiles_install_their_extra_from_constraints_and_copy_what_exists(name, extra, base):
    steps = _dockerfile(name)
    text = (DOCKER / name).read_text()
    assert f'".[{extra}]"' in text and "-c constraints.txt" in text
    assert base in text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extra in extras
    torch_pin = next(line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
    assert torch_pin in text  # the same torch everywhere
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    for ins, rest in steps:
        if ins == "COPY" and "--from" not in rest:
            for src in [w for w in rest.split() if not w.startswith("--")][:-1]:
                assert (ROOT / src).exists(), (name, src)
                assert f"!{src}" in ignore or f"!{src}/**" in ignore, f"{src} is excluded by {name}.dockerignore"


def test_edge_image_has_no_ray_and_no_cloud_code():
    text = (DOCKER / "edge.Dockerfile").read_text()
    copies = [rest for ins, rest in _dockerfile("edge.Dockerfile") if ins == "COPY" and "--from" not in rest]
    assert not any(w.startswith(("cloud", "simulations")) for c in copies for w in c.split())
    assert "find_spec('ray')" in text  # the build fails if anything pulled Ray in
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["edge"]
    assert not any(d.startswith("ray") for d in extras)
    assert "TARGETARCH" in text and "arm64" in text  # multi-arch: CPU torch per architecture
    assert _entrypoint("edge.Dockerfile") == ["fedge"]


def test_entry_points_the_images_and_manifests_rely_on_exist():
    """The console script every container runs, and the Flower app components `flwr run` packs from the image."""
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from .commands import import_path_resolves

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["fedge"] == "fedge.common.cli:main"
    assert callable(import_path_resolves("fedge.common.cli:main"))
    comps = meta["tool"]["flwr"]["app"]["components"]
    assert comps == {"serverapp": "fedge.cloud.server_app:app", "clientapp": "fedge.edge.client_app:app"}
    assert isinstance(import_path_resolves(comps["serverapp"]), ServerApp)
    assert isinstance(import_path_resolves(comps["clientapp"]), ClientApp)
    cloud_copies = " ".join(rest for ins, rest in _dockerfile("cloud.Dockerfile") if ins == "COPY")
    for pkg in ("fedge", "common", "edge", "cloud"):  # the app `flwr run` builds in the image holds both components
        assert f" {pkg} ./{pkg}" in cloud_copies, pkg
