"""STYLE.md rule 1: common <- edge, common <- cloud; edge never imports cloud or ray; cloud never imports edge.

Also through strings (``importlib.import_module("cloud.x")``, ``"edge.y:app"``), and every public module names its
public API in ``__all__``.
"""

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"common": {"edge", "cloud", "simulations", "ray"}, "edge": {"cloud", "simulations", "ray"},
             "cloud": {"edge", "simulations"}}


def _modules(path: Path) -> list[str]:
    """Absolute module names a file imports (``from fedge import edge`` gives ``fedge.edge``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [f"{node.module}.{a.name}" for a in node.names] if node.module == "fedge" else [node.module]
    return out


def _imports(path: Path) -> set[str]:
    """Layers (``fedge.edge`` -> ``edge``) and other top-level packages a file imports."""
    return {m.split(".")[1] if m.startswith("fedge.") else m.split(".")[0] for m in _modules(path)}


@pytest.mark.parametrize("pkg", sorted(FORBIDDEN))
def test_package_never_imports_forbidden_layers(pkg):
    bad = []
    for f in sorted((ROOT / pkg).rglob("*.py")):
        hits = _imports(f) & FORBIDDEN[pkg]
        if hits:
            bad.append(f"{f.relative_to(ROOT)} imports {sorted(hits)}")
    assert not bad, "\n".join(bad)


def test_project_imports_its_layers_by_their_fedge_names():
    """``common`` & co. are not top-level packages once installed: every import names ``fedge.common`` & co."""
    bad = []
    for folder in (*FORBIDDEN, "simulations", "tests", "benchmarks", "deploy"):
        for f in sorted((ROOT / folder).rglob("*.py")):
            hits = {m for m in _modules(f) if m.split(".")[0] in {"common", "edge", "cloud", "simulations"}}
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
        "from fedge import edge\n"
        "for m in pkgutil.walk_packages(edge.__path__, 'fedge.edge.'): importlib.import_module(m.name)\n"
        "assert not any(k == 'ray' or k.startswith('ray.') for k in sys.modules), 'ray got imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


MODULE_STRING = re.compile(r"^(?:fedge\.)?(common|edge|cloud|simulations|ray)(\.[A-Za-z_][A-Za-z0-9_]*)+(:[A-Za-z_]\w*)?$")
# the `fedge` command is the composition root: it names each side's command group by string, loaded on demand
COMPOSITION_ROOT = {Path("common/cli.py")}


def _string_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {m.group(1) for n in ast.walk(tree)  # the layer: `fedge.cloud.x` -> `cloud`
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and (m := MODULE_STRING.match(n.value))}


@pytest.mark.parametrize("pkg", sorted(FORBIDDEN))
def test_package_never_names_forbidden_layers_in_strings(pkg):
    bad = []
    for f in sorted((ROOT / pkg).rglob("*.py")):
        if f.relative_to(ROOT) in COMPOSITION_ROOT:
            continue
        hits = _string_imports(f) & FORBIDDEN[pkg]
        if hits:
            bad.append(f"{f.relative_to(ROOT)} names {sorted(hits)} in a string")
    assert not bad, "\n".join(bad)


def test_string_rule_catches_a_dotted_module_name(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('import importlib\nimportlib.import_module("fedge.cloud.serving")\nAPP = "fedge.edge.client_app:app"\n'
                 'TEXT = "cloud. is not a module"\n')
    assert _string_imports(f) == {"cloud", "edge"}


@pytest.mark.parametrize("pkg", ["common", "edge", "cloud", "simulations"])
def test_every_public_module_declares_its_api_in_all(pkg):
    bad = []
    root = importlib.import_module(f"fedge.{pkg}")
    for m in pkgutil.walk_packages(root.__path__, f"fedge.{pkg}."):
        leaf = m.name.rsplit(".", 1)[-1]
        if m.ispkg or leaf.startswith("_"):
            continue
        mod = importlib.import_module(m.name)
        names = getattr(mod, "__all__", None)
        if names is None:
            bad.append(f"{m.name}: no __all__")
            continue
        bad += [f"{m.name}.__all__ names {n!r}, which it does not define" for n in names if not hasattr(mod, n)]
    assert not bad, "\n".join(bad)
