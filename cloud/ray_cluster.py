"""How a cloud process joins Ray: the Ray of Flower's simulation engine, the cluster ``fedge cloud start`` named,
or a local one.

In a simulation (Flower's ``run_simulation`` or a ``--simulation`` SuperLink) the simulation engine starts Ray in
the ServerApp's own process; :func:`ensure_ray` joins it. In deployment the ServerApp process joins the cluster
named by ``$FEDGE_RAY_ADDRESS`` (``fedge cloud start`` sets it to its embedded Ray or to ``--ray-address``), or
else starts a local Ray.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["RAY_ADDRESS_ENV", "RAY_ADDRESS_FILE", "ensure_ray"]

RAY_ADDRESS_ENV = "FEDGE_RAY_ADDRESS"
RAY_ADDRESS_FILE = "ray-address"  # in the run dir, written by `fedge cloud start` on every start


def ensure_ray(*, wait_for_simulation_s: float = 0.0, num_cpus: int | None = None,
               run_dir: str | Path | None = None) -> str:
    """Make sure this process is connected to Ray; return how (``existing``, ``address``, ``local``).

    With ``wait_for_simulation_s > 0`` (a ServerApp inside Flower's simulation engine, which starts Ray in
    this very process shortly after the nodes register) wait that long for it rather than starting a
    second Ray. Otherwise join the address in ``run_dir/ray-address`` (written by ``fedge cloud start``),
    else ``$FEDGE_RAY_ADDRESS``, else start a local Ray.
    """
    import ray

    t0 = time.monotonic()
    while not ray.is_initialized() and time.monotonic() - t0 < wait_for_simulation_s:
        time.sleep(0.2)
    if ray.is_initialized():
        return "existing"
    f = Path(run_dir) / RAY_ADDRESS_FILE if run_dir else None
    addr = f.read_text().strip() if f is not None and f.is_file() else os.environ.get(RAY_ADDRESS_ENV, "")
    if addr:
        ray.init(address=addr, ignore_reinit_error=True, log_to_driver=False)
        return "address"
    ray.init(ignore_reinit_error=True, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return "local"
