"""The dashboard in a real headless browser (Debian's chromium through Playwright) during a small simulation
with hostile devices: the version and device rows advance, the accuracy plot gains points, refused updates
appear under their reason, and the page logs no console error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
HOSTILE = ("nonfinite", "decode", "keys", "shape", "norm")  # what tests/cloud/adversarial_app.py sends


def _wait_up(url: str, proc: subprocess.Popen[str], timeout_s: float, log: Path) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise AssertionError(f"the simulation ended before its dashboard came up:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "api/state", timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"no dashboard at {url} after {timeout_s:.0f} s")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_dashboard_page_follows_a_simulation_with_hostile_devices(tmp_path):
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        pytest.skip("chromium is not installed (apt-get install -y --no-install-recommends chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    # 6 devices, none a straggler: 5 send hostile updates, 1 is honest and makes every version (K = 1)
    log = open(tmp_path / "sim.log", "w")  # noqa: SIM115  (closed in the finally below)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.cloud.sim_main", str(tmp_path / "run"), "6", "tests.cloud.adversarial_app:app",
         "aggregation.versions=6", "aggregation.buffer_size=1", "aggregation.concurrency=6",
         "aggregation.max_norm=50.0", 'aggregation.norm_action="reject"', "profiles.straggler_fraction=0.0",
         "train.local_steps=3", "data.samples_per_device=40", "data.eval_samples=100",
         f'dashboard.address="127.0.0.1:{port}"'],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)  # a file: a full pipe would stall it
    errors: list[str] = []
    try:
        _wait_up(url, proc, 180.0, tmp_path / "sim.log")
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_function("document.body.dataset.seq !== undefined", timeout=20_000)
            v0 = int(page.inner_text("#version"))
            accepted0 = _accepted(page)
            page.wait_for_function(f"Number(document.getElementById('version').textContent) > {v0}", timeout=120_000)
            page.wait_for_function("document.querySelectorAll('#devices tbody tr').length === 6", timeout=20_000)
            page.wait_for_function("Number(document.getElementById('accuracy-chart').dataset.points) >= 2",
                                   timeout=120_000)
            page.wait_for_function(
                "[...document.querySelectorAll('#rejections li[data-reason]')].some(li => "
                f"{list(HOSTILE)!r}.includes(li.dataset.reason))", timeout=120_000)
            assert _accepted(page) > accepted0  # the honest device's row advanced
            reasons = page.eval_on_selector_all("#rejections li[data-reason]", "els => els.map(e => e.dataset.reason)")
            assert set(reasons) & set(HOSTILE)
            _check_api(url)
            series = page.get_attribute("#accuracy-chart", "data-series") or ""
            assert series.startswith("fused")  # fused first, then one line per modality subset
            page.fill("#filter", "nonfinite")  # the filter narrows the table to the refusing devices
            page.wait_for_function("document.querySelectorAll('#devices tbody tr').length < 6", timeout=10_000)
            page.wait_for_function("document.getElementById('conn').textContent === 'finished'", timeout=90_000)
            browser.close()
        assert proc.wait(timeout=60) == 0, (tmp_path / "sim.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert not errors, errors


def _check_api(url: str) -> None:
    """The real run's /api/state fits its schema; its /metrics parse and count the same refusals."""
    import jsonschema
    from prometheus_client.parser import text_string_to_metric_families

    from fedge.cloud.dashboard.http import STATIC

    state = json.loads(urllib.request.urlopen(url + "api/state", timeout=5).read())
    jsonschema.validate(state, json.loads((STATIC / "state.schema.json").read_text()))
    text = urllib.request.urlopen(url + "metrics", timeout=5).read().decode()
    refused = {s.labels["reason"]: s.value for f in text_string_to_metric_families(text) if f.name == "fedge_updates"
               for s in f.samples if s.labels.get("outcome") == "refused"}
    # read after the state: every count there, at least as high here
    assert set(refused) & set(HOSTILE) and all(refused.get(r, 0) >= n for r, n in state["rejections"].items())


def _accepted(page) -> int:  # type: ignore[no-untyped-def]
    """Accepted updates summed over the device table."""
    return int(page.evaluate("[...document.querySelectorAll('#devices tbody tr')]"
                             ".reduce((s, tr) => s + Number(tr.children[5].textContent || 0), 0)"))
