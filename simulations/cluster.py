"""Joining an existing Ray cluster for a simulation (``fedge simulate run --ray-address``).

Flower's simulation engine calls ``ray.init`` only when Ray is not initialised yet, so :func:`connect` joins the
cluster in the driver first; the engine then places its ClientApp actors on the cluster's nodes and the
ServerApp (in this process) starts the aggregator actor there too. The prepared data and the pretraining run
(Ray Train) go to the same cluster.

A job on an existing cluster does not inherit the driver's environment or working directory (its workers are
forked by each node's raylet), so :func:`connect` ships them in the job's ``runtime_env``: ``PYTHONPATH`` from
this process's ``sys.path`` (the apps' code), every ``FEDGE_*`` variable (``$FEDGE_RUN_CONFIG`` names the run's
config) and the driver's working directory, entered by :func:`enter_driver_dir` in every worker, so relative
paths mean the same on every node. Nodes must see the same paths (one machine, or shared storage).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CLUSTER_FILE",
    "DRIVER_DIR_ENV",
    "ClusterError",
    "check_address",
    "connect",
    "describe",
    "enter_driver_dir",
    "job_env",
    "summary",
    "write",
]

DRIVER_DIR_ENV = "FEDGE_DRIVER_DIR"  # the driver's working directory, entered by every worker of the job
CLUSTER_FILE = "cluster.json"  # in the run dir: the cluster's address and nodes when the run joined it


class ClusterError(RuntimeError):
    """The Ray cluster named by ``--ray-address`` cannot be joined."""


def enter_driver_dir() -> None:
    """Worker setup hook: work in the driver's directory when this node has it (else stay where the raylet is)."""
    d = os.environ.get(DRIVER_DIR_ENV, "")
    if d and os.path.isdir(d):
        os.chdir(d)


def job_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables a job's workers need: the apps' import path, every ``FEDGE_*`` variable, ``extra``."""
    env = {k: v for k, v in os.environ.items() if k.startswith("FEDGE_")}
    # '' on sys.path is the driver's directory: spelled out, since workers start elsewhere
    paths = [p or os.getcwd() for p in sys.path] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env[DRIVER_DIR_ENV] = os.getcwd()
    env.setdefault("RAY_USAGE_STATS_ENABLED", os.environ.get("RAY_USAGE_STATS_ENABLED", "0"))
    env.update(extra or {})
    return env


def check_address(address: str, *, timeout_s: float = 10.0) -> None:
    """Refuse, in one line, an address that cannot name a cluster to join: a Ray Client ``ray://`` address,
    one that is not ``HOST:PORT`` or ``auto``, or a ``HOST:PORT`` that does not accept connections (``ray.init``
    would retry for a minute). Raises :class:`ClusterError`."""
    address = address.strip()
    if address.startswith("ray://"):
        raise ClusterError(f"--ray-address {address}: Ray Client addresses are not supported; run the simulation "
                           "on a cluster node (e.g. the head) with the GCS address HOST:PORT or 'auto'")
    if address == "auto":  # Ray resolves it from this node's running cluster, or says there is none
        return
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"--ray-address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by "
                           "default) or 'auto'")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def connect(address: str, *, env: Mapping[str, str] | None = None, timeout_s: float = 10.0) -> dict[str, Any]:
    """Join the Ray cluster at ``address`` (``HOST:PORT`` or ``auto``) as this process's Ray; return its summary
    (address and alive nodes with their CPUs). Raises :class:`ClusterError` with a one-line reason."""
    address = address.strip()
    check_address(address, timeout_s=timeout_s)
    import ray

    if ray.is_initialized():
        raise ClusterError("Ray is already initialised in this process; cannot join another cluster")
    try:
        ray.init(address=address, log_to_driver=True,
                 runtime_env={"env_vars": job_env(env),
                              "worker_process_setup_hook": f"{__name__}.{enter_driver_dir.__name__}"})
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(f"cannot join the Ray cluster at {address}: {first}") from None
    return summary(address)


def summary(address: str) -> dict[str, Any]:
    """The joined cluster: its GCS address and its alive nodes (id, IP, CPUs)."""
    import ray

    nodes = [{"node_id": n["NodeID"], "ip": n.get("NodeManagerAddress", ""),
              "cpus": float(n.get("Resources", {}).get("CPU", 0.0))} for n in ray.nodes() if n.get("Alive")]
    return {"address": address, "gcs_address": ray.get_runtime_context().gcs_address, "nodes": nodes}


def describe(info: Mapping[str, Any]) -> str:
    """One line for the console: where the run is and how big the cluster is."""
    nodes = info["nodes"]
    return (f"[fedge] Ray cluster {info['gcs_address']}: {len(nodes)} node(s), "
            f"{sum(n['cpus'] for n in nodes):g} CPUs")


def write(run_dir: Path, info: Mapping[str, Any]) -> Path:
    """Save the cluster's summary as ``run_dir/cluster.json``."""
    import json

    path = Path(run_dir) / CLUSTER_FILE
    path.write_text(json.dumps(info, indent=1))
    return path
