"""``fedge status`` (and ``fedge cloud status``): the live state of a running aggregator in the terminal
(:func:`fedge.cloud.status.fetch_state`, :func:`fedge.cloud.status.render`)."""

from __future__ import annotations

import json
import time
import urllib.error
from typing import Annotated

import typer

from fedge.cloud.dashboard.http import DEFAULT_PORT, TOKEN_ENV
from fedge.cloud.status import URL_ENV, fetch_state, render

__all__ = ["status_command"]


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
