"""``fedge edge``: commands that run on a device, one module per command; each parses its options and calls the
domain code (:mod:`fedge.edge.ingest`, :mod:`fedge.edge.keyframes`, :mod:`fedge.edge.agent`, ...)."""

from __future__ import annotations

import typer

from .agent import run_command
from .ingest import ingest_command
from .keyframes import keyframes_command
from .predict import predict_command
from .store import app as store_app

__all__ = ["app", "info"]

app = typer.Typer(no_args_is_help=True, help="Run on a device: ingest streams, train adapters, fetch shards.")


@app.command("info")
def info() -> None:
    """Print what this device installation can do (versions of the edge stack)."""
    import flwr
    import onnxruntime
    import torch

    typer.echo(f"flwr {flwr.__version__}  torch {torch.__version__}  onnxruntime {onnxruntime.__version__}")


app.command("predict")(predict_command)
app.command("run")(run_command)
app.command("keyframes")(keyframes_command)
app.command("ingest")(ingest_command)
app.add_typer(store_app, name="store")
