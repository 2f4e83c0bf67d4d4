"""``fedge status``: the live state of a running aggregator in the terminal (its dashboard's ``/api/state``)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Annotated, Any

import typer

from fedge.common.shard_api import AUTH_HEADER, DEVICE_HEADER, bearer
from fedge.common.units import human_bytes

from .dashboard.http import DEFAULT_PORT, TOKEN_ENV

__all__ = ["URL_ENV", "fetch_state", "render", "status_command"]

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


def status_command(
    url: Annotated[str, typer.Option("--url", envvar=URL_ENV, show_envvar=True,
                                     help="The aggregator's dashboard (`--dashboard` of `fedge cloud start` or "
                                          "`fedge simulate run`).")] = f"http://127.0.0.1:{DEFAULT_PORT}/",
    token: Annotated[str, typer.Option("--token", envvar=TOKEN_ENV, show_envvar=True,
                                       help="Dashboard token (needed when it is served beyond loopback).")] = "",
    device: Annotated[str, typer.Option("--device", help="Device id, when --token is a device token of the "
                                                         "tokens file.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole state as JSON (/api/state).")] = False,
    watch: Annotated[float, typer.Option("--watch", help="Print again every this many seconds until Ctrl-C "
                                                         "(0 = once).")] = 0.0,
) -> None:
    """Show the live state of a running aggregator: version, buffer, accuracy, refusals, devices."""
    while True:
        try:
            state = fetch_state(url, token=token, device=device)
        except urllib.error.HTTPError as e:
            typer.echo(f"fedge status: {url} refused the request ({e.code}: "
                       f"{'a token is needed: --token' if e.code == 401 else e.reason})", err=True)
            raise typer.Exit(2) from None
        except (OSError, ValueError) as e:
            typer.echo(f"fedge status: cannot reach a fedge dashboard at {url} ({e})", err=True)
            raise typer.Exit(2) from None
        typer.echo(json.dumps(state, indent=2) if as_json else render(state))
        if watch <= 0:
            return
        time.sleep(watch)
        typer.echo("")
