"""STYLE.md rule 1: common <- edge, common <- cloud; edge never imports cloud or ray; cloud never imports edge."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"common": {"edge", "cloud", "simulations", "ray"}, "edge": {"cloud", "simulations", "ray"},
             "cloud": {"edge", "simulations"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("pkg", sorted(FORBIDDEN))
def test_package_never_imports_forbidden_layers(pkg):
    bad = []
    for f in sorted((ROOT / pkg).rglob("*.py")):
        hits = _imports(f) & FORBIDDEN[pkg]
        if hits:
            bad.append(f"{f.relative_to(ROOT)} imports {sorted(hits)}")
    assert not bad, "\n".join(bad)


def test_edge_imports_without_ray_installed():
    """Import every edge module in a fresh interpreter where `import ray` fails."""
    code = (
        "import sys, importlib, pkgutil\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'): raise ImportError('ray blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import edge\n"
        "for m in pkgutil.walk_packages(edge.__path__, 'edge.'): importlib.import_module(m.name)\n"
        "assert not any(k == 'ray' or k.startswith('ray.') for k in sys.modules), 'ray got imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
