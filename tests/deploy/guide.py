"""The deployment guide's commands, read from docs/deploy.md so that tests run exactly what the guide says.

A fenced ``bash`` block whose first line is ``# step: NAME`` is a step; each line of it is one command, run by
``bash -c`` with the guide's variables (``$WORK``, ports) in the environment. A line ending in ``&`` starts a
long-running process.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .procs import BIN, ROOT, Proc

GUIDE = ROOT / "docs" / "deploy.md"
_BLOCK = re.compile(r"```bash\n# step: (?P<name>[\w-]+)\n(?P<body>.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Command:
    """One line of a step and whether it runs in the background."""

    line: str
    background: bool


def steps() -> dict[str, str]:
    """Step name -> the block's text."""
    return {m["name"]: m["body"] for m in _BLOCK.finditer(GUIDE.read_text())}


def commands(step: str) -> list[Command]:
    """The commands of ``step`` (comment lines dropped, ``\\`` continuations joined)."""
    out = []
    for raw in steps()[step].replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        background = line.endswith("&")
        out.append(Command(line=line.rstrip("&").strip(), background=background))
    return out


def guide_env(**extra: str) -> dict[str, str]:
    """Environment for running guide commands: the venv first on PATH, plus the guide's variables."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_step(step: str, env: dict[str, str], cwd: Path, logs: Path, timeout: float = 600.0) -> list[Proc]:
    """Run a step's foreground lines one after another (each must succeed) and start its background lines."""
    started = []
    for i, c in enumerate(commands(step)):
        if c.background:
            started.append(Proc(["bash", "-c", f"exec {c.line}"], logs / f"{step}-{i}.log", env, cwd=cwd))
            continue
        r = subprocess.run(["bash", "-c", c.line], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=timeout, check=False)
        assert r.returncode == 0, f"step {step}: {c.line}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return started
