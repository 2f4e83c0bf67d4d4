"""A subset of KubeRay's ray.io/v1 CRD schemas (RayCluster, RayService, RayJob), written from KubeRay's API reference.

It holds the fields fedge's manifests use plus their well-known siblings, with the types KubeRay's CRDs declare,
and forbids unknown fields at every level it describes, so a misspelt field (``workerGroupSpec``,
``minReplica``) or a wrong type (``num-cpus: 2`` instead of the string ``"2"``: rayStartParams is a string map)
fails. Pod templates are left open here: tests validate them with the Kubernetes client's V1PodTemplateSpec.
"""

from __future__ import annotations

from typing import Any

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"metadata": {"type": "object"},
                                                                         "spec": {"type": "object"}}}

HEAD_GROUP: dict[str, Any] = {
    "type": "object",
    "required": ["template"],
    "additionalProperties": False,
    "properties": {
        "rayStartParams": _STR_MAP,
        "template": _POD_TEMPLATE,
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
        "headService": {"type": "object"},
        "enableIngress": {"type": "boolean"},
        "suspend": {"type": "boolean"},
    },
}

WORKER_GROUP: dict[str, Any] = {
    "type": "object",
    "required": ["groupName", "template"],
    "additionalProperties": False,
    "properties": {
        "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "replicas": {"type": "integer", "minimum": 0},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "numOfHosts": {"type": "integer", "minimum": 1},
        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
        "rayStartParams": _STR_MAP,
        "template": _POD_TEMPLATE,
        "scaleStrategy": {"type": "object", "properties": {"workersToDelete": {"type": "array"}}},
        "suspend": {"type": "boolean"},
    },
}

RAY_CLUSTER_SPEC: dict[str, Any] = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                "image": {"type": "string"}, "imagePullPolicy": {"type": "string"},
                "resources": {"type": "object"}, "env": {"type": "array"}, "envFrom": {"type": "array"},
                "securityContext": {"type": "object"}, "volumeMounts": {"type": "array"},
                "version": {"enum": ["v1", "v2"]},
            },
        },
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
        "headServiceAnnotations": _STR_MAP,
        "gcsFaultToleranceOptions": {"type": "object"},
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
    },
}

_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"},
                                                                 "annotations": _STR_MAP, "labels": _STR_MAP}}


def _object(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": _META,
                       "spec": spec, "status": {"type": "object"}},
    }


RAY_CLUSTER = _object("RayCluster", RAY_CLUSTER_SPEC)

RAY_SERVICE = _object("RayService", {
    "type": "object",
    "required": ["serveConfigV2", "rayClusterConfig"],
    "additionalProperties": False,
    "properties": {
        "serveConfigV2": {"type": "string"},  # a YAML document in a string (Serve's config file format)
        "rayClusterConfig": RAY_CLUSTER_SPEC,
        "serviceUnhealthySecondThreshold": {"type": "integer"},
        "deploymentUnhealthySecondThreshold": {"type": "integer"},
        "serveService": {"type": "object"},
        "upgradeStrategy": {"type": "object"},
        "excludeHeadPodFromServeSvc": {"type": "boolean"},
    },
})

RAY_JOB = _object("RayJob", {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "entrypoint": {"type": "string"},
        "runtimeEnvYAML": {"type": "string"},
        "jobId": {"type": "string"},
        "metadata": _STR_MAP,
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 0},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "rayClusterSpec": RAY_CLUSTER_SPEC,
        "clusterSelector": _STR_MAP,
        "submitterPodTemplate": _POD_TEMPLATE,
        "submitterConfig": {"type": "object"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "entrypointNumCpus": {"type": "number"},
        "entrypointNumGpus": {"type": "number"},
        "entrypointResources": {"type": "string"},
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "deletionStrategy": {"type": "object"},
    },
})

SCHEMAS = {"RayCluster": RAY_CLUSTER, "RayService": RAY_SERVICE, "RayJob": RAY_JOB}


def cluster_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayCluster spec(s) inside a KubeRay object (its own, a RayService's or a RayJob's)."""
    spec = obj["spec"]
    if obj["kind"] == "RayCluster":
        return [spec]
    key = {"RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}[obj["kind"]]
    return [spec[key]] if key in spec else []
