"""``fedge simulate``: the whole federation on this machine, on an embedded Ray."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Run federated simulations locally on an embedded Ray.")

DEFAULT_SCENARIO = Path(__file__).parent / "scenarios" / "quickstart.toml"


@app.command("run")
def run_cmd(
    scenario: Path = typer.Argument(DEFAULT_SCENARIO, help="Scenario / config TOML file."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<scenario>-<time>)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set aggregation.versions=5"),
    nodes: int = typer.Option(8, "--nodes", help="Number of virtual devices."),
) -> None:
    """Run a federated simulation of the shared model and print accuracy per global version."""
    from common.config import ConfigError, load_config, parse_overrides

    from .runner import run

    try:
        cfg = load_config(toml_path=scenario, overrides=parse_overrides(set_))
    except (ConfigError, FileNotFoundError) as e:
        typer.echo(f"fedge simulate: {e}", err=True)
        raise typer.Exit(2) from None
    out = out or Path("runs") / f"{scenario.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = run(cfg, num_nodes=nodes, out_dir=out)
    typer.echo(f"run directory: {run_dir}")
