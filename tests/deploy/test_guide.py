"""docs/deploy.md: every command the guide shows for fedge, Flower and Ray parses with the real program's parser,
including the ones inside `ray exec '...'`, and every file it names exists."""

from __future__ import annotations

import re
import shlex

from .commands import CHECKERS, check_argv, program, script_commands
from .guide import GUIDE, steps
from .procs import ROOT

_BASH = re.compile(r"```bash\n(.*?)```", re.DOTALL)


def _guide_vars() -> dict[str, str]:
    """The values the guide exports for its variables (``export WORK=... SUPERLINK_PORT=9093 ...``)."""
    line = next(x for x in _raw_lines() if x.startswith("export "))
    return dict(w.split("=", 1) for w in shlex.split(line)[1:])


def _raw_lines() -> list[str]:
    out = []
    for block in _BASH.findall(GUIDE.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _lines() -> list[str]:
    env = _guide_vars()
    return [re.sub(r"\$\{?([A-Z][A-Z0-9_]*)\}?", lambda m: env.get(m[1], m[0]), x) for x in _raw_lines()]


def test_every_fedge_flower_and_ray_command_in_the_guide_parses():
    checked = []
    for line in _lines():
        for argv in script_commands(line):
            if program(argv[0]) == "ray" and argv[1:2] == ["exec"]:
                checked += [check_argv(inner) for inner in script_commands(argv[3].replace(".venv/bin/", ""))
                            if program(inner[0]) in CHECKERS]
            if program(argv[0]) in CHECKERS:
                checked.append(check_argv(argv))
    assert {"fedge", "flwr", "ray", "python"} <= set(checked)
    assert checked.count("fedge") >= 15


def test_files_the_guide_names_exist_and_its_steps_are_unique():
    text = GUIDE.read_text()
    for path in set(re.findall(r"(?<![\w/$])((?:deploy|docs|tests/deploy|cloud|edge)/[\w./-]+\.(?:py|yaml|sh|service|md|toml|example))",
                               text)):
        assert (ROOT / path).exists(), path
    names = re.findall(r"^# step: ([\w-]+)$", text, re.MULTILINE)
    assert len(names) == len(set(names)) == len(steps())
    assert "[docs/deploy.md](docs/deploy.md)" in (ROOT / "README.md").read_text()
    assert "no engine" in text  # the testing section says Docker was not run here


def test_guide_names_the_ports_the_code_uses():
    text = GUIDE.read_text()
    for row in ("| 9093 |", "| 8000 |", "| 9094 |", "| 6379, 8265, 10001 |"):
        assert row in text, row
    # the SuperLink's port in the guide's one-server/VM commands is the one deploy/ files use
    assert "--superlink cloud.example.org:9093" in text and "--port 9093" in text


def test_default_ports_in_the_guide_are_the_codes_defaults():
    import inspect

    from fedge.cloud.serving import start_shard_server
    from fedge.edge.cli.agent import run_command

    assert inspect.signature(run_command).parameters["port"].default == 9094  # SuperNode ClientApp API
    assert inspect.signature(start_shard_server).parameters["port"].default == 8000  # Serve's HTTP proxy
