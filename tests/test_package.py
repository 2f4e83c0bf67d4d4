"""fedge installs as one package: ``fedge.common``, ``fedge.edge``, ... and no top-level ``common``."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import fedge

BIN = Path(sys.executable).parent


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_fedge_imports_and_gives_the_installed_version():
    assert fedge.__version__ == version("fedge")
    assert (Path(fedge.__file__).parent / "py.typed").is_file()


def test_outside_the_source_tree_only_fedge_names_import(tmp_path):
    ok = _python("import fedge.common, fedge.edge, fedge.cloud, fedge.simulations, fedge.common.media.shots", tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    for name in ("common", "edge", "cloud", "simulations"):
        r = _python(f"import {name}", tmp_path)
        assert r.returncode != 0 and f"No module named '{name}'" in r.stderr, (name, r.stderr[-500:])


def test_fedge_version_prints_the_installed_version():
    r = subprocess.run([str(BIN / "fedge"), "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == f"fedge {version('fedge')}"
