"""``fedge cloud``: commands that run on the cloud side."""

from __future__ import annotations

import typer

__all__ = ["app", "info"]

app = typer.Typer(no_args_is_help=True, help="Run the cloud side: aggregator, trainer, shard server.")


@app.command("info")
def info() -> None:
    """Print the versions of the cloud stack (Flower, Ray)."""
    import flwr
    import ray

    typer.echo(f"flwr {flwr.__version__}  ray {ray.__version__}")


from .certs import certs_command

app.command("certs")(certs_command)

from .shards_cli import keys_command, publish_command, serve_command, token_command

app.command("keys")(keys_command)
app.command("token")(token_command)
app.command("publish")(publish_command)
app.command("serve")(serve_command)

from .launcher import start_command

app.command("start")(start_command)

from .train_cli import train_command

app.command("train")(train_command)

from .status import status_command

app.command("status")(status_command)
