"""``fedge edge``: commands that run on a device."""

from __future__ import annotations

import typer

__all__ = ["app", "info"]

app = typer.Typer(no_args_is_help=True, help="Run on a device: ingest streams, train adapters, fetch shards.")


@app.command("info")
def info() -> None:
    """Print what this device installation can do (versions of the edge stack)."""
    import flwr
    import onnxruntime
    import torch

    typer.echo(f"flwr {flwr.__version__}  torch {torch.__version__}  onnxruntime {onnxruntime.__version__}")

from .predict import predict_command

app.command("predict")(predict_command)

from .agent import run_command

app.command("run")(run_command)

from .keyframes import keyframes_command

app.command("keyframes")(keyframes_command)

from .ingest_cli import ingest_command

app.command("ingest")(ingest_command)

from .store_cli import app as store_app

app.add_typer(store_app, name="store")
