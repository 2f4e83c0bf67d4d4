"""``fedge cloud start``: the aggregator (embedded Ray, a Flower SuperLink and the fedge run) until the run ends or
Ctrl-C (:func:`fedge.cloud.launcher.start`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedge.cloud.launcher import LaunchOptions, start, superlink_command

from . import dashboard_options as dash

__all__ = ["start_command"]


def start_command(
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Run directory: config, metrics, checkpoints, "
                                          "SuperLink database; reuse it to resume.")] = Path("runs/cloud"),
    config: Annotated[Path | None, typer.Option("--config", help="Config TOML (scenario) file.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Override a config key: --set aggregation.versions=20")] = None,
    host: Annotated[str, typer.Option("--host", help="SuperLink address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="SuperLink port (all APIs; never Flower's 8000).")] = 9092,
    ray_address: Annotated[str, typer.Option(
        "--ray-address", help="Join this Ray cluster instead of starting an embedded one.")] = "",
    num_cpus: Annotated[int, typer.Option("--num-cpus", help="CPUs of the embedded Ray.")] = 2,
    ssl_ca_certfile: Annotated[Path | None, typer.Option("--ssl-ca-certfile", help="CA certificate (TLS).")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option("--ssl-certfile", help="SuperLink certificate (TLS).")] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option("--ssl-keyfile", help="SuperLink private key (TLS).")] = None,
    auth_public_keys: Annotated[list[Path] | None, typer.Option(
        "--auth-public-key", help="A SuperNode public key to register (enables SuperNode auth).")] = None,
    dashboard: dash.DashboardAddress = "",
    dashboard_token: dash.DashboardToken = "",
    dashboard_tokens: dash.DashboardTokens = "",
    public: dash.DashboardPublic = False,
    ray_dashboard: dash.RayDashboard = False,
) -> None:
    """Start the aggregator: embedded Ray, a Flower SuperLink and the fedge run; Ctrl-C checkpoints and stops."""
    from fedge.common.config import ConfigError, load_config, parse_overrides

    try:  # DashboardError is a ValueError: one line, exit 2
        watch = dash.dashboard_overrides(dashboard, token=dashboard_token, tokens_file=dashboard_tokens, public=public)
        cfg = load_config(toml_path=config, overrides=parse_overrides(list(set_ or []) + watch))
        opts = LaunchOptions(run_dir=run_dir, host=host, port=port, ray_address=ray_address, num_cpus=num_cpus,
                             ssl_ca_certfile=ssl_ca_certfile, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                             auth_public_keys=list(auth_public_keys or []), ray_dashboard=ray_dashboard)
        superlink_command(opts)  # validates the TLS / auth combination before anything starts
    except (ConfigError, FileNotFoundError, ValueError) as e:
        typer.echo(f"fedge cloud start: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(start(cfg, opts, echo=typer.echo))
