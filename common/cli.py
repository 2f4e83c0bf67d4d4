"""The ``fedge`` command: groups ``edge``, ``cloud`` and ``simulate``, each from its own package, and
``fedge evaluate`` (:mod:`common.evaluate_cli`).

A group whose package (or its extra's dependencies) is not installed is left out with a note, so that an
edge device without Ray still gets ``fedge edge``. Groups are looked up by module name so that ``common``
never imports ``edge`` or ``cloud`` (STYLE.md rule 1).
"""

from __future__ import annotations

import importlib
import sys

import typer

GROUPS = {
    "edge": ("edge.cli", "Run on a device: ingest streams, train adapters, fetch shards."),
    "cloud": ("cloud.cli", "Run the cloud side: aggregator, trainer, shard server."),
    "simulate": ("simulations.cli", "Run the whole federation on this machine (embedded Ray)."),
}


def build_app() -> typer.Typer:
    """Assemble the root Typer app from the installed groups."""
    root = typer.Typer(
        name="fedge",
        help="fedge: edge-cloud federated training of multimodal mixture-of-experts models.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for name, (module, help_) in GROUPS.items():
        try:
            group = importlib.import_module(module).app
        except ImportError as e:  # extra not installed on this machine
            missing = typer.Typer(help=f"{help_} [unavailable: {e.name or e}]")

            @missing.callback(invoke_without_command=True)
            def _unavailable(_e: str = str(e)) -> None:
                typer.echo(f"fedge: this group needs packages that are not installed ({_e})", err=True)
                raise typer.Exit(2)

            root.add_typer(missing, name=name)
            continue
        root.add_typer(group, name=name, help=help_)
    from .evaluate_cli import evaluate_command

    root.command("evaluate")(evaluate_command)
    return root


def main() -> None:
    """Console-script entry point."""
    app = build_app()
    sys.exit(app())


if __name__ == "__main__":
    main()
