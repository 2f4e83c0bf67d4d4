"""``fedge cloud``: commands that run on the cloud side, one module per command or command family; each parses its
options and calls the domain code (:mod:`fedge.cloud.certs`, :mod:`fedge.cloud.launcher`, ...)."""

from __future__ import annotations

import typer

from .certs import certs_command
from .launch import start_command
from .shards import keys_command, publish_command, serve_command, token_command
from .status import status_command
from .train import train_command

__all__ = ["app", "info"]

app = typer.Typer(no_args_is_help=True, help="Run the cloud side: aggregator, trainer, shard server.")


@app.command("info")
def info() -> None:
    """Print the versions of the cloud stack (Flower, Ray)."""
    import flwr
    import ray

    typer.echo(f"flwr {flwr.__version__}  ray {ray.__version__}")


app.command("certs")(certs_command)
app.command("keys")(keys_command)
app.command("token")(token_command)
app.command("publish")(publish_command)
app.command("serve")(serve_command)
app.command("start")(start_command)
app.command("train")(train_command)
app.command("status")(status_command)
