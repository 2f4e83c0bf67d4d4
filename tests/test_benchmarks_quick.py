"""Every benchmark keeps working: each ``benchmarks/*.py`` runs with ``--quick`` (seconds to a minute, figures not
meaningful) and ends with its ``name=value`` line. New benchmarks are picked up by the glob."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# learning.py --quick also has a test of its own that checks its rows and files (tests/simulations)
BENCHMARKS = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
LAST_LINE = re.compile(r"^[A-Za-z0-9_]+=\S+( [A-Za-z0-9_]+=\S+)*$")


@pytest.mark.integration
@pytest.mark.xdist_group("benchmarks")  # one at a time: each is a whole federation (Ray and its workers)
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("name", [b for b in BENCHMARKS if b != "learning.py"])
def test_benchmark_runs_quick_and_prints_its_figures_last(name):
    # a short TMPDIR: Ray puts its AF_UNIX sockets under it, and those paths are capped at 107 bytes
    # (pytest's tmp_path for a parametrized test is too long for that)
    tmp = tempfile.mkdtemp(prefix="fb-", dir="/tmp" if os.path.isdir("/tmp") else None)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "TMPDIR": tmp}
    try:
        r = subprocess.run([sys.executable, f"benchmarks/{name}", "--quick"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=1400, check=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert LAST_LINE.match(last), f"{name}: last line is not name=value pairs: {last!r}"


def test_every_benchmark_has_a_quick_mode():
    for name in BENCHMARKS:
        assert "--quick" in (ROOT / "benchmarks" / name).read_text() or "parse_quick(" in (
            ROOT / "benchmarks" / name).read_text(), f"{name} has no --quick"
