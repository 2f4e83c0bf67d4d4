"""The deployment guide's commands, read from docs/deploy.md so that tests run exactly what the guide says.

A fenced ``bash`` block whose first line is ``# step: NAME`` is a step; each command in it is one line (``\\``
continues a line). Lines ending in ``&`` start a long-running process.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from .procs import BIN, ROOT

GUIDE = ROOT / "docs" / "deploy.md"
_BLOCK = re.compile(r"```bash\n# step: (?P<name>[\w-]+)\n(?P<body>.*?)```", re.S)


@dataclass(frozen=True)
class Command:
    """One command of a step: argv (with $VARS expanded from ``env``), whether it runs in the background."""

    argv: list[str]
    background: bool
    line: str


def steps() -> dict[str, str]:
    """Step name -> the block's text."""
    return {m["name"]: m["body"] for m in _BLOCK.finditer(GUIDE.read_text())}


def commands(step: str, env: dict[str, str] | None = None) -> list[Command]:
    """The commands of ``step`` with ``$NAME``/``${NAME}`` taken from ``env``; fedge/flwr/kubectl from the venv."""
    body = steps()[step]
    env = env or {}
    out = []
    for raw in body.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.split(" # ")[0].strip()
        background = line.endswith("&")
        line = line.rstrip("&").strip()
        expanded = re.sub(r"\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda m: env.get(m[1], m[0]), line)
        argv = shlex.split(expanded)
        exe = BIN / argv[0]
        if "/" not in argv[0] and exe.exists():
            argv[0] = str(exe)
        out.append(Command(argv=argv, background=background, line=line))
    return out


def guide_env(**extra: str) -> dict[str, str]:
    """Environment for running guide commands: the venv first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def as_text(cmds: list[Command]) -> str:
    return "\n".join(shlex.join(c.argv) for c in cmds)


__all__ = ["GUIDE", "Command", "Path", "as_text", "commands", "guide_env", "steps"]
