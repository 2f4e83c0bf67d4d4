"""The ``fedge`` command: groups ``edge``, ``cloud`` and ``simulate``, each from its own package, and
``fedge evaluate`` (:mod:`fedge.common.evaluate_cli`).

A group whose package (or its extra's dependencies) is not installed is left out with a note, so that an
edge device without Ray still gets ``fedge edge``. Groups are looked up by module name so that ``common``
never imports ``edge`` or ``cloud`` (STYLE.md rule 1).
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

__all__ = ["COMMANDS", "GROUPS", "TRACEBACK_ENV", "build_app", "main", "run"]

GROUPS = {
    "edge": ("fedge.edge.cli", "Run on a device: ingest streams, train adapters, fetch shards."),
    "cloud": ("fedge.cloud.cli", "Run the cloud side: aggregator, trainer, shard server."),
    "simulate": ("fedge.simulations.cli", "Run the whole federation on this machine (embedded Ray)."),
}
COMMANDS = {  # top-level commands, looked up by module name like the groups
    "status": ("fedge.cloud.cli.status", "status_command"),
}


def _print_version(value: bool) -> None:
    if value:
        from fedge import __version__

        typer.echo(f"fedge {__version__}")
        raise typer.Exit()


def _root_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the installed fedge version and exit."),
) -> None:
    """fedge: edge-cloud federated training of multimodal mixture-of-experts models."""


def build_app() -> typer.Typer:
    """Assemble the root Typer app from the installed groups."""
    root = typer.Typer(
        name="fedge",
        help="fedge: edge-cloud federated training of multimodal mixture-of-experts models.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    root.callback()(_root_options)
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
    for name, (module, attr) in COMMANDS.items():
        try:
            root.command(name)(getattr(importlib.import_module(module), attr))
        except ImportError:  # its group's extra is not installed: the group above says so
            continue
    from .evaluate_cli import evaluate_command

    root.command("evaluate")(evaluate_command)
    return root


TRACEBACK_ENV = "FEDGE_TRACEBACK"  # set to 1 to see the traceback of an error a command did not expect


def run(argv: list[str] | None = None) -> int:
    """Run the ``fedge`` command on ``argv`` (default: the process arguments); return the exit code.

    Every error is one line on stderr: a bad option value or usage (``error: Invalid value for ...``, exit 2),
    the errors commands expect (they print their own ``error:`` line), and anything else that escapes a
    command (``error: <type>: <message>``, exit 1) instead of a traceback.
    """
    import click

    try:
        rv = build_app()(args=argv, prog_name="fedge", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:  # a bare group: its help, as click would show it
        e.show()
        return e.exit_code
    except click.ClickException as e:
        print(f"error: {' '.join(e.format_message().split())}", file=sys.stderr)
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        msg = " ".join(str(e).split())[:300] or "no details"
        print(f"error: {type(e).__name__}: {msg} (set {TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
        return 1
    return rv if isinstance(rv, int) else 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()
