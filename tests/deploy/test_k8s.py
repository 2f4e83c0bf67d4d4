"""deploy/k8s: render each overlay with kustomize (kubectl's) after the guide's secret steps, then check every object.

Core objects are deserialized into the Kubernetes client's models (unknown fields fail by round trip); KubeRay objects
are checked against a CRD schema subset, their pod templates as V1PodTemplateSpec, their worker groups by Ray's own
KubeRay autoscaler config derivation, and the RayService's Serve config by Ray Serve's schema and fedge's app builder.
Every command a container runs is parsed by the real program's parser.
"""

from __future__ import annotations

import inspect
import shutil
import subprocess
import tomllib

import jsonschema
import pytest
import ray
import yaml
from kubernetes import client
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.serve.schema import ServeDeploySchema

from fedge.cloud.certs import server_sans
from fedge.cloud.state import RAY_ADDRESS_ENV
from fedge.common.config import config_from_context, load_config

from .commands import check_container, check_script, import_path_resolves
from .guide import guide_env, run_step
from .kuberay_schema import SCHEMAS, cluster_specs
from .procs import BIN, ROOT

pytestmark = pytest.mark.integration  # runs the guide's fedge commands and kubectl as real processes

OVERLAYS = ("dev", "gpu")
CORE = {"Namespace": "V1Namespace", "ConfigMap": "V1ConfigMap", "Secret": "V1Secret", "Service": "V1Service",
        "PersistentVolumeClaim": "V1PersistentVolumeClaim", "Deployment": "V1Deployment", "Job": "V1Job",
        "Ingress": "V1Ingress"}
API = client.ApiClient()
SUPERLINK_PORT = 9093


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A copy of deploy/k8s with the secrets the guide's k8s-secrets step creates."""
    work = tmp_path_factory.mktemp("k8s")
    shutil.copytree(ROOT / "deploy" / "k8s", work / "deploy" / "k8s")
    assert run_step("k8s-secrets", guide_env(), work, work) == []
    return work


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request, workdir):
    """(overlay, objects) as `kubectl kustomize` renders them."""
    overlay = request.param
    r = subprocess.run([str(BIN / "kubectl"), "kustomize", f"deploy/k8s/overlays/{overlay}"], cwd=workdir,
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    return overlay, [d for d in yaml.safe_load_all(r.stdout) if d]


def _strip(x):
    """Drop empty values so that a manifest and its model round trip compare equal."""
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if v is not None and _strip(v) not in ({}, [])}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _model(data, kind: str):
    obj = API._ApiClient__deserialize(data, kind)  # the generated models check required fields and enums
    back = _strip(API.sanitize_for_serialization(obj))
    assert back == _strip(data), f"{kind}: fields the model does not know (misspelt?) in {data}"
    return obj


def _pod_templates(obj) -> list[tuple[str, dict]]:
    kind, spec = obj["kind"], obj["spec"]
    if kind in ("Deployment", "Job"):
        return [(obj["metadata"]["name"], spec["template"])]
    out = []
    for cs in cluster_specs(obj):
        out.append((f"{obj['metadata']['name']}/head", cs["headGroupSpec"]["template"]))
        out += [(f"{obj['metadata']['name']}/{g['groupName']}", g["template"]) for g in cs.get("workerGroupSpecs", [])]
    return out


def test_guide_step_exists_and_every_overlay_renders(rendered):
    _, objs = rendered
    kinds = sorted({o["kind"] for o in objs})
    assert {"RayCluster", "RayService", "RayJob", "Deployment", "Service", "Secret", "Ingress"} <= set(kinds)
    assert all(o["metadata"].get("namespace") == "fedge" for o in objs if o["kind"] != "Namespace")


def test_core_objects_match_the_kubernetes_models(rendered):
    _, objs = rendered
    for o in objs:
        if o["kind"] in CORE:
            _model(o, CORE[o["kind"]])


def test_kuberay_objects_match_the_crd_schema_and_pod_templates_the_pod_model(rendered):
    _, objs = rendered
    ray_objs = [o for o in objs if o["kind"] in SCHEMAS]
    assert {o["kind"] for o in ray_objs} == set(SCHEMAS)
    for o in ray_objs:
        jsonschema.validate(o, SCHEMAS[o["kind"]])
        for cs in cluster_specs(o):
            assert cs["rayVersion"] == ray.__version__  # the Ray that flwr 1.42 pins, in the image
        for name, tpl in _pod_templates(o):
            _model(tpl, "V1PodTemplateSpec"), name


def test_the_crd_schema_subset_catches_typos_and_wrong_types(rendered):
    _, objs = rendered
    cluster = next(o for o in objs if o["kind"] == "RayCluster")
    bad = yaml.safe_load(yaml.safe_dump(cluster))
    bad["spec"]["workerGroupSpecs"][0]["minReplica"] = 1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMAS["RayCluster"])
    bad = yaml.safe_load(yaml.safe_dump(cluster))
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 2  # KubeRay wants strings
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMAS["RayCluster"])


def test_rays_kuberay_autoscaler_reads_every_cluster_and_gpu_groups_only_in_the_gpu_overlay(rendered):
    overlay, objs = rendered
    gpu_groups = {}
    for o in objs:
        for cs in cluster_specs(o) if o["kind"] in SCHEMAS else []:
            cr = {"metadata": {"name": o["metadata"]["name"], "namespace": "fedge"}, "spec": cs}
            conf = _derive_autoscaling_config_from_ray_cr(cr)  # also validates against ray-schema.json
            for group, node in conf["available_node_types"].items():
                if node["resources"].get("GPU"):
                    gpu_groups[(o["kind"], group)] = node["resources"]["GPU"]
    if overlay == "gpu":
        assert gpu_groups == {("RayJob", "gpu-workers"): 1, ("RayCluster", "gpu-workers"): 1}
        job = next(o for o in objs if o["kind"] == "RayJob")
        pod = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    else:
        assert gpu_groups == {}


def test_every_container_command_parses_with_the_real_program(rendered):
    _, objs = rendered
    seen = set()
    for o in objs:
        if o["kind"] == "RayJob":
            seen.update(check_script(o["spec"]["entrypoint"]))
        for _, tpl in _pod_templates(o) if o["kind"] in ("Deployment", "Job", *SCHEMAS) else []:
            for c in tpl["spec"]["containers"]:
                seen.update(check_container(c.get("command"), c.get("args")))
    assert {"flower-superlink", "flower-superexec", "flwr", "fedge"} <= seen


def _args(container) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in container.get("args", []) if a.startswith("--") and "=" in a)


def test_ports_agree_between_superlink_its_service_and_its_clients(rendered):
    _, objs = rendered
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    link = by[("Deployment", "fedge-superlink")]["spec"]["template"]["spec"]["containers"][0]
    a = _args(link)
    assert int(a["port"]) == SUPERLINK_PORT and a["host"] == "0.0.0.0" and a["isolation"] == "process"
    assert {p["name"]: p["containerPort"] for p in link["ports"]}["superlink"] == SUPERLINK_PORT
    svc = by[("Service", "fedge-superlink")]["spec"]
    assert [(p["port"], p["targetPort"]) for p in svc["ports"]] == [(SUPERLINK_PORT, "superlink")]
    head = by[("RayCluster", "fedge-aggregator")]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert f"--runtime-api-address=fedge-superlink:{SUPERLINK_PORT}" in head["args"][0]
    env = {e["name"]: e["value"] for e in head["env"]}
    assert env[RAY_ADDRESS_ENV] == "auto"  # cloud/state.py joins the head's Ray
    assert env["FEDGE_RUN_CONFIG"] == "/etc/fedge/fedge.toml"
    assert '"FEDGE_RUN_CONFIG"' in inspect.getsource(config_from_context)  # the variable the ServerApp reads
    submit = by[("Job", "fedge-submit-run")]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert f'address = \\"fedge-superlink:{SUPERLINK_PORT}\\"' in submit or \
        f'address = "fedge-superlink:{SUPERLINK_PORT}"' in submit


def test_every_secret_configmap_and_volume_reference_resolves(rendered):
    _, objs = rendered
    names = {(o["kind"], o["metadata"]["name"]) for o in objs}
    for o in objs:
        for where, tpl in _pod_templates(o) if o["kind"] in ("Deployment", "Job", *SCHEMAS) else []:
            for v in tpl["spec"].get("volumes", []):
                if "secret" in v:
                    assert ("Secret", v["secret"]["secretName"]) in names, (where, v)
                if "configMap" in v:
                    assert ("ConfigMap", v["configMap"]["name"]) in names, (where, v)
                if "persistentVolumeClaim" in v:
                    assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names, (where, v)
            mounted = {v["name"] for v in tpl["spec"].get("volumes", [])}
            for c in tpl["spec"]["containers"]:
                for m in c.get("volumeMounts", []):
                    assert m["name"] in mounted, (where, m)
    for o in objs:
        if o["kind"] == "Ingress":
            for t in o["spec"]["tls"]:
                assert ("Secret", t["secretName"]) in names
            for rule in o["spec"]["rules"]:
                for p in rule["http"]["paths"]:
                    # KubeRay names the Serve service of RayService X "X-serve-svc"
                    svc = p["backend"]["service"]["name"]
                    assert svc.endswith("-serve-svc") and ("RayService", svc[: -len("-serve-svc")]) in names


def test_tls_secret_holds_the_generated_certificate_whose_names_cover_the_services(rendered, workdir):
    overlay, objs = rendered
    tls = next(o for o in objs if o["kind"] == "Secret" and o["type"] == "kubernetes.io/tls")
    assert set(tls["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    dns, _ = server_sans(workdir / "deploy/k8s/base/certs/superlink.crt")
    assert {"fedge-superlink", "fedge-superlink.fedge.svc", "fedge-superlink.fedge.svc.cluster.local"} <= set(dns)
    for o in objs:
        if o["kind"] == "Ingress":
            hosts = {h for t in o["spec"]["tls"] for h in t["hosts"]}
            if overlay == "dev":  # localtest.me resolves to 127.0.0.1 and is covered by the IP SAN at the ingress
                assert hosts == {"shards.localtest.me"}
            else:
                assert hosts <= set(dns)


def test_serve_config_is_valid_and_names_fedge_s_shard_server(rendered):
    from fedge.cloud import serving

    _, objs = rendered
    svc = next(o for o in objs if o["kind"] == "RayService")
    conf = ServeDeploySchema.model_validate(yaml.safe_load(svc["spec"]["serveConfigV2"]))
    (app,) = conf.applications
    assert import_path_resolves(app.import_path) is serving.build_app
    assert app.name == serving.APP_NAME
    assert [d.name for d in app.deployments] == [serving.DEPLOYMENT]
    bound = serving.build_app(app.args)  # the builder accepts exactly these args (no Ray needed to bind)
    assert bound is not None
    assert conf.http_options.port == 8000


def test_run_config_in_the_config_map_is_a_valid_fedge_config(rendered, tmp_path):
    overlay, objs = rendered
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("fedge-config"))
    (tmp_path / "fedge.toml").write_text(cm["data"]["fedge.toml"])
    cfg = load_config(toml_path=tmp_path / "fedge.toml")
    assert cfg.aggregation.mode == "async" and cfg.data.source == "store"
    assert cfg.training.use_gpu == ("on" if overlay == "gpu" else "auto")
    assert tomllib.loads(cm["data"]["fedge.toml"])["run_dir"].startswith("/data/")
    # global training runs inside the loop and publishes into the store the shard server serves, signed with the
    # key mounted on the aggregator's head
    assert cfg.training.every_versions > 0
    svc = next(o for o in objs if o["kind"] == "RayService")
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    assert cfg.publish.store == app["args"]["store"]
    head = next(o for o in objs if o["kind"] == "RayCluster" and o["metadata"]["name"].endswith("fedge-aggregator"))
    mounts = head["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    keys = next(m for m in mounts if m["name"] == "manifest-key")
    assert cfg.publish.signing_key.startswith(keys["mountPath"] + "/")
