"""The live state of a running aggregator, fetched from its dashboard's ``/api/state`` and rendered as text for
``fedge status`` (:mod:`fedge.cloud.cli.status`)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from fedge.common.shard_api import AUTH_HEADER, DEVICE_HEADER, bearer
from fedge.common.units import human_bytes

__all__ = ["URL_ENV", "fetch_state", "render"]

URL_ENV = "FEDGE_DASHBOARD_URL"


def fetch_state(url: str, *, token: str = "", device: str = "", timeout_s: float = 5.0) -> dict[str, Any]:
    """GET ``<url>/api/state``; raises ``OSError`` (unreachable, refused) or ``ValueError`` (not the state)."""
    headers = {AUTH_HEADER: bearer(token)} if token else {}
    if device:
        headers[DEVICE_HEADER] = device
    req = urllib.request.Request(url.rstrip("/") + "/api/state", headers=headers)
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        state = json.loads(r.read())
    if not isinstance(state, dict) or "federation" not in state:
        raise ValueError(f"{url} did not answer with a fedge state")
    return state


def render(state: dict[str, Any], *, max_devices: int = 50) -> str:
    """A plain-text summary: federation line, accuracy, rejections, staleness, then one line per device."""
    f, now = state["federation"], state["now"]
    mode = f"async K={f['buffer_size']} C={f['concurrency']}" if f["mode"] == "async" else \
        f"sync, {f['concurrency']} per round"
    head = (f"fedge {'running' if state['running'] else 'finished'}: version {f['version']} of "
            f"{f['target_versions']} ({mode}, {f['clock']} clock {f['clock_time']:.1f} s), "
            f"{f['versions_per_minute']:.1f} versions/min, buffer {f['buffered']}/{f['buffer_size']}, "
            f"base {f['base_version']}")
    lines = [head]
    if state["versions"]:
        last = state["versions"][-1]
        accs = "  ".join(f"{k} {v:.3f}" for k, v in sorted(last["accuracy"].items(), key=lambda kv: kv[0] != "fused"))
        lines.append(f"accuracy (v{last['version']}): {accs}")
    lines.append(f"updates: {f['accepted']} accepted, {f['refused']} refused"
                 + (" (" + ", ".join(f"{k} {v}" for k, v in state["rejections"].items()) + ")"
                    if state["rejections"] else ""))
    if state["staleness"]:
        lines.append("staleness: " + "  ".join(f"{s['staleness']}:{s['count']}" for s in state["staleness"]))
    ds = state["device_states"]
    lines.append(f"bytes: {human_bytes(state['bytes']['up'])} up, {human_bytes(state['bytes']['down'])} down; devices: "
                 f"{ds['training']} training, {ds['idle']} idle, {ds['lost']} lost")
    for e in state["events"][-3:]:
        lines.append(f"event: {e['kind']} " + " ".join(f"{k}={v}" for k, v in e.items() if k not in ("kind", "wall")))
    lines.append(f"{'id':>20} {'dev':>4} {'modalities':<12} {'state':<8} {'base':>4} {'acc':>4} {'ref':>4} "
                 f"{'stale':>5} {'seen':>7}  last refusal")
    for d in state["devices"][:max_devices]:
        seen = f"{now - d['last_seen']:.0f}s" if d["last_seen"] else "-"
        lines.append(f"{d['id']:>20} {d['partition'] if d['partition'] >= 0 else '-':>4} "
                     f"{'+'.join(d['modalities']) or '-':<12} {d['state']:<8} "
                     f"{'-' if d['base_version'] is None else d['base_version']:>4} {d['accepted']:>4} "
                     f"{d['refused']:>4} {'-' if d['last_staleness'] is None else d['last_staleness']:>5} "
                     f"{seen:>7}  {d['last_reason'] or ''}")
    if len(state["devices"]) > max_devices:
        lines.append(f"... {len(state['devices']) - max_devices} more devices (--json for all)")
    return "\n".join(lines)

