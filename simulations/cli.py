"""``fedge simulate``: the whole federation on this machine, on an embedded Ray (or on a cluster: ``--ray-address``).

``fedge simulate SCENARIO`` runs one scenario (``run`` is the explicit form); ``fedge simulate compare A B`` runs
two settings over the same devices and data and plots them together.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from fedge.cloud.cli import dashboard_options as dash

__all__ = ["DEFAULT_SCENARIO", "app", "compare_cmd", "flower_baseline_cmd", "prepare_cmd", "run_cmd"]

DEFAULT_SCENARIO = Path(__file__).parent / "scenarios" / "quickstart.toml"


class _ScenarioFirst(TyperGroup):
    """A group whose first argument may be a scenario file: ``simulate X.toml`` means ``simulate run X.toml``."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


app = typer.Typer(
    cls=_ScenarioFirst, no_args_is_help=True,
    help="Run federated simulations locally on an embedded Ray (or on an existing cluster with --ray-address): "
         "`fedge simulate SCENARIO.toml [--out DIR] [--set key=value ...]` or `fedge simulate compare A.toml B.toml`.",
)


def _load(scenario: Path, sets: list[str]):  # type: ignore[no-untyped-def]
    from fedge.common.config import ConfigError, load_config, parse_overrides

    try:
        return load_config(toml_path=scenario, overrides=parse_overrides(sets))
    except (ConfigError, FileNotFoundError) as e:
        typer.echo(f"fedge simulate: {e}", err=True)
        raise typer.Exit(2) from None


@app.command("run")
def run_cmd(
    scenario: Annotated[Path, typer.Argument(help="Scenario TOML (simulations/scenarios/*.toml).")] = DEFAULT_SCENARIO,
    out: Annotated[Path | None, typer.Option("--out", help="Run directory (default runs/<scenario>-<time>).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key, e.g. --set aggregation.versions=5")] = None,
    nodes: Annotated[int | None, typer.Option("--nodes", help="Number of virtual devices (= simulation.devices).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
    dashboard: dash.DashboardAddress = "",
    dashboard_token: dash.DashboardToken = "",
    dashboard_tokens: dash.DashboardTokens = "",
    public: dash.DashboardPublic = False,
    ray_dashboard: dash.RayDashboard = False,
    ray_address: Annotated[str, typer.Option(
        "--ray-address", envvar="RAY_ADDRESS", show_envvar=True, metavar="HOST:PORT|auto",
        help="Run on this existing Ray cluster (the head's GCS address, or 'auto' on a cluster node) instead of "
             "an embedded Ray: pretraining, Flower's ClientApp actors and the aggregator all run there. Every "
             "node must see the run's paths (one machine or shared storage).")] = "",
) -> None:
    """Run a scenario: render device streams, ingest them into stores, train federated, write the report."""
    from .cluster import ClusterError, check_address

    try:  # before the apps are imported and any data is prepared
        if ray_address and ray_dashboard:
            raise ClusterError("--ray-dashboard starts an embedded Ray's dashboard and a cluster has its own: "
                               "drop one of --ray-dashboard, --ray-address")
        if ray_address:
            check_address(ray_address)
    except ClusterError as e:
        typer.echo(f"fedge simulate: {e}", err=True)
        raise typer.Exit(2) from None

    from fedge.cloud.dashboard import DashboardError
    from fedge.common.base_weights import BaseWeightsError
    from fedge.common.dataset import DataError

    from .runner import run

    try:
        watch = dash.dashboard_overrides(dashboard, token=dashboard_token, tokens_file=dashboard_tokens, public=public)
    except DashboardError as e:
        typer.echo(f"fedge simulate: {e}", err=True)
        raise typer.Exit(2) from None
    cfg = _load(scenario, list(set_ or []) + ([f"simulation.devices={nodes}"] if nodes else []) + watch)
    out = out or Path("runs") / f"{scenario.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        run_dir = run(cfg, out_dir=out, progress=not quiet, ray_dashboard=ray_dashboard,
                      ray_address=ray_address.strip())
    except (BaseWeightsError, DataError, ClusterError) as e:  # a base, data or cluster named that cannot be used
        typer.echo(f"fedge simulate: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"run directory: {run_dir}")
    typer.echo(f"report: {run_dir / 'report.md'}")


@app.command("compare")
def compare_cmd(
    a: Annotated[Path, typer.Argument(help="Scenario A (TOML).")],
    b: Annotated[Path, typer.Argument(help="Scenario B (TOML); may be A again with --set-b overrides.")],
    out: Annotated[Path | None, typer.Option("--out", help="Output directory (default runs/compare-<time>).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key in both A and B.")] = None,
    set_a: Annotated[list[str] | None, typer.Option("--set-a", help="Override a key in A only.")] = None,
    set_b: Annotated[list[str] | None, typer.Option("--set-b", help="Override a key in B only.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Run A and B on the same devices and data; plot both in one figure (e.g. async vs sync)."""
    from .compare import CompareError, compare

    cfg_a = _load(a, list(set_ or []) + list(set_a or []))
    cfg_b = _load(b, list(set_ or []) + list(set_b or []))
    out = out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        path = compare(cfg_a, cfg_b, out_dir=out, names=(_name(a, set_a or []), _name(b, set_b or [])), progress=not quiet)
    except CompareError as e:
        typer.echo(f"fedge simulate compare: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"comparison: {path}")


def _name(path: Path, sets: list[str]) -> str:
    return path.stem + ("" if not sets else " (" + ", ".join(sets) + ")")


@app.command("flower-baseline", hidden=True)
def flower_baseline_cmd(
    scenario: Annotated[Path, typer.Argument(help="Scenario TOML.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Benchmark peer: the scenario's devices and data under plain Flower FedAvg (no fedge server or codec)."""
    from . import flower_baseline as fb
    from .runner import run

    cfg = _load(scenario, list(set_ or []))
    run_dir = run(cfg, out_dir=out, progress=not quiet, report=False, apps=(fb.server_app, fb.client_app))
    typer.echo(f"run directory: {run_dir}")


@app.command("prepare")
def prepare_cmd(
    scenario: Annotated[Path, typer.Argument(help="Scenario TOML.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory for `flwr run` (gets config.toml).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key.")] = None,
) -> None:
    """Render and ingest a scenario's data (or check the stores it names), write its resolved config.toml for
    `flwr run . FED --run-config`."""
    import dataclasses

    from fedge.common.dataset import DataError

    from .given_data import resolve_data
    from .runner import default_cache

    try:
        cfg, _ = resolve_data(_load(scenario, list(set_ or [])), default_cache())
    except DataError as e:  # data the user named that cannot be used
        typer.echo(f"fedge simulate prepare: {e}", err=True)
        raise typer.Exit(2) from None
    run_dir = out.resolve()
    path = dataclasses.replace(cfg, run_dir=str(run_dir)).save(run_dir)
    typer.echo(f"config: {path}")
    typer.echo(f"run it: flwr run . <federation> --run-config {path} "
               f"--federation-config num-supernodes={cfg.simulation.devices}")
