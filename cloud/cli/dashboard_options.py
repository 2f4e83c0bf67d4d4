"""The dashboard's command-line options, shared by ``fedge cloud start`` and ``fedge simulate run``."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from fedge.cloud.dashboard.http import TOKEN_ENV, preflight

__all__ = [
    "DashboardAddress",
    "DashboardPublic",
    "DashboardToken",
    "DashboardTokens",
    "RayDashboard",
    "dashboard_overrides",
]

DashboardAddress = Annotated[str, typer.Option(
    "--dashboard", metavar="[HOST:]PORT",
    help="Serve the live dashboard (page, /api/state, /metrics) on [HOST:]PORT; a bare port means 127.0.0.1. "
         "Beyond loopback it needs --dashboard-token (or $FEDGE_DASHBOARD_TOKEN, or --dashboard-tokens) unless "
         "--public.")]
DashboardToken = Annotated[str, typer.Option(
    "--dashboard-token", envvar=TOKEN_ENV, show_envvar=True,
    help="Token the dashboard requires (Authorization: Bearer, or ?token= on the page URL).")]
DashboardTokens = Annotated[str, typer.Option(
    "--dashboard-tokens", metavar="FILE",
    help="Also accept any device/operator token of this tokens file (the shard server's, `fedge cloud token`).")]
DashboardPublic = Annotated[bool, typer.Option(
    "--public", help="Serve the dashboard beyond loopback without a token (read-only, but anyone can look).")]
RayDashboard = Annotated[bool, typer.Option(
    "--ray-dashboard", help="Start Ray's own dashboard on 127.0.0.1 and print its URL (slower start, more memory).")]


def dashboard_overrides(address: str, *, token: str, tokens_file: str, public: bool) -> list[str]:
    """Config overrides (``--set`` form) for these options, after checking the dashboard can start.

    The token is a secret: it goes to the ServerApp through ``$FEDGE_DASHBOARD_TOKEN``, never into the saved
    config. Raises :class:`fedge.cloud.dashboard.http.DashboardError` with a one-line reason.
    """
    if not address:
        return []
    preflight(address, public=public, token=token, tokens_file=tokens_file or None)
    if token:
        os.environ[TOKEN_ENV] = token
    sets = [f'dashboard.address="{address}"', f"dashboard.public={'true' if public else 'false'}"]
    if tokens_file:
        sets.append(f'dashboard.tokens_file="{os.path.abspath(tokens_file)}"')
    return sets
