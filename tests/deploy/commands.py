"""Check that a command line in a deploy/ file would be accepted by the real program's own argument parser.

Nothing is executed: Flower's argparse parsers, fedge's and flwr's Typer/Click apps and Ray's Click CLI parse the
arguments exactly as the installed program would, so a misspelt flag, a missing required option or a command that
does not exist fails here instead of on a cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import typer

SHELL_WORDS = {"set", "mkdir", "printf", "test", "for", "do", "done", "in", "chown", "chmod", "ulimit", "cd", "echo",
               "exec", "true", "false", "until", "sleep", "if", "then", "fi", "cat", "[", "]", "bash", "sh"}


def _argparse(factory: Callable[[], argparse.ArgumentParser]) -> Callable[[list[str]], None]:
    def check(args: list[str]) -> None:
        parser = factory()
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser.parse_args(args)
        except SystemExit as e:
            msg = err.getvalue().strip().splitlines()[-1:] or ["exited"]
            raise AssertionError(f"{shlex.join(args)}: {msg[0]}") from e
    return check


def _click(get: Callable[[], click.Command], prog: str) -> Callable[[list[str]], None]:
    def check(args: list[str]) -> None:
        cmd, rest, name = get(), list(args), prog
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                while True:
                    ctx = cmd.make_context(name, rest)
                    if not isinstance(cmd, click.Group):
                        return
                    rest = list(ctx.protected_args) + list(ctx.args)
                    if not rest:
                        raise AssertionError(f"{name}: no subcommand given")
                    sub_name, sub, rest = cmd.resolve_command(ctx, rest)
                    if sub is None:
                        raise AssertionError(f"{name}: no command {sub_name!r}")
                    cmd, name = sub, f"{name} {sub_name}"
        except click.ClickException as e:
            raise AssertionError(f"{name} {shlex.join(rest)}: {e.format_message()}") from e
    return check


def _fedge() -> click.Command:
    from fedge.common.cli import build_app

    return typer.main.get_command(build_app())


def _flwr() -> click.Command:
    from flwr.cli.app import app

    return typer.main.get_command(app)


def _ray() -> click.Command:
    from ray.scripts.scripts import cli

    return cli


def _superlink() -> argparse.ArgumentParser:
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

    return _parse_args_run_superlink()


def _supernode() -> argparse.ArgumentParser:
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    return _parse_args_run_supernode()


def _superexec() -> argparse.ArgumentParser:
    from flwr.supercore.cli.flower_superexec import _parse_args

    return _parse_args()


IMAGE_SRC = "/home/ray/fedge/"  # where the cloud image keeps the source tree (deploy/docker/cloud.Dockerfile)


def _python(args: list[str]) -> None:
    if args and args[0].endswith(".py"):
        from .procs import ROOT

        path = args[0].replace(IMAGE_SRC, f"{ROOT}/", 1)
        if not path.startswith("/"):
            path = f"{ROOT}/{path}"
        spec = importlib.util.spec_from_file_location("_deploy_script", path)
        assert spec is not None and spec.loader is not None and Path(path).is_file(), f"no script {args[0]}"
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _argparse(mod.parser)(args[1:])  # scripts in deploy/ expose their argparse parser as parser()
    elif args[:1] == ["-m"]:
        assert importlib.util.find_spec(args[1]) is not None, f"python -m {args[1]}: no such module"
    elif args[:1] == ["-c"]:
        compile(args[1], "<python -c>", "exec")


CHECKERS: dict[str, Callable[[list[str]], None]] = {
    "fedge": _click(_fedge, "fedge"),
    "flwr": _click(_flwr, "flwr"),
    "ray": _click(_ray, "ray"),
    "flower-superlink": _argparse(_superlink),
    "flower-supernode": _argparse(_supernode),
    "flower-superexec": _argparse(_superexec),
    "python": _python,
    "python3": _python,
}


def program(word: str) -> str:
    """The program name of an argv[0] that may be a path (/opt/fedge/venv/bin/fedge -> fedge)."""
    return word.rsplit("/", 1)[-1]


def check_argv(argv: list[str]) -> str:
    """Parse ``argv`` with its program's parser; return the program name. Unknown programs are an error."""
    prog = program(argv[0])
    if prog not in CHECKERS:
        raise AssertionError(f"no parser known for {argv[0]!r} (in {shlex.join(argv)})")
    CHECKERS[prog](argv[1:])
    return prog


def script_commands(script: str) -> Iterator[list[str]]:
    """Split a shell script (``bash -c`` body) into simple commands, dropping shell plumbing.

    Operators ``; && || | &`` separate commands; ``exec`` and leading ``VAR=value`` assignments are dropped;
    redirections (``> file``) end a command's arguments; commands that are shell built-ins or coreutils are
    skipped, as are words that are variables (``$X``, ``${X/..}``); ``$(...)`` counts as one word.
    """
    script = re.sub(r"\$\([^()]*\)", "command-substitution", script)  # $(...) is one word to the outer command
    lex = shlex.shlex(script, posix=True, punctuation_chars=";&|<>")
    lex.whitespace_split = True
    cur: list[str] = []
    redirect = False

    def flush() -> Iterator[list[str]]:
        words = list(cur)
        cur.clear()
        while words and (words[0] in ("exec", "do", "then", "else", "!")
                         or ("=" in words[0] and not words[0].startswith("-"))):
            words.pop(0)
        if words and not words[0].startswith("$") and program(words[0]) not in SHELL_WORDS:
            yield words

    for tok in lex:
        if tok in (";", "&&", "||", "|", "&", ";;"):
            yield from flush()
            redirect = False
        elif tok in (">", ">>", "<", "2>", "&>"):
            redirect = True
        elif not redirect:
            cur.append(tok)
        else:
            redirect = False  # the file name after a redirection
    yield from flush()


def check_script(script: str) -> list[str]:
    """Check every known program in a shell command line; return the programs found."""
    return [check_argv(cmd) for cmd in script_commands(script)]


def check_container(command: list[str] | str | None, args: list[str] | None = None) -> list[str]:
    """Check a container's command (+ args, as Kubernetes/compose run them); return the programs found.

    ``bash -c SCRIPT`` / ``bash -lc -- SCRIPT`` are split into simple commands and each known program checked.
    """
    if isinstance(command, str):
        command = shlex.split(command)
    argv = list(command or []) + list(args or [])
    if not argv:
        return []
    if program(argv[0]) in ("bash", "sh"):
        rest = [a for a in argv[1:] if a not in ("--",)]
        while rest and rest[0].startswith("-") and "c" not in rest[0]:
            rest.pop(0)
        assert rest and rest[0].startswith("-") and "c" in rest[0], f"expected `{argv[0]} -c SCRIPT`: {argv}"
        return check_script(rest[1])
    return [check_argv(argv)]


def import_path_resolves(path: str) -> object:
    """``module:attribute`` (Flower and Serve import paths) -> the object; fails naming what is missing."""
    module, _, attr = path.partition(":")
    assert module and attr, f"import path {path!r} is not module:attribute"
    obj = importlib.import_module(module)
    for part in attr.split("."):
        assert hasattr(obj, part), f"{module} has no attribute {attr!r}"
        obj = getattr(obj, part)
    return obj
