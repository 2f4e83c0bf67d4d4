"""The simulation report and comparison: pure helpers, plots from a metrics file, refusal of unequal data."""

import json

import numpy as np
import pytest

from fedge.common.config import load_config
from fedge.common.run_log import VersionRecord
from fedge.simulations.compare import CompareError, compare
from fedge.simulations.report import first_reaching, rejections, series, staleness_values, write_report

RAW = [
    {"version": 1, "accuracy": 0.3, "upload_bytes": 100.0, "virtual_time": 5.0, "bytes_sent": 100.0,
     "staleness": [0, 0, 1], "rejected": {}},
    {"version": 2, "accuracy": 0.6, "upload_bytes": 120.0, "virtual_time": 9.0, "bytes_sent": 220.0,
     "staleness": [1, 2], "rejected": {"non_finite": 1}},
    {"version": 3, "accuracy": 0.8, "upload_bytes": 90.0, "virtual_time": 12.5, "bytes_sent": 310.0,
     "staleness": [0, 3], "rejected": {"non_finite": 1, "stale": 2}},
]
RECORDS = [VersionRecord.from_json(r) for r in RAW]


def test_series_time_to_target_staleness_and_cumulative_rejections():
    s = series(RECORDS)
    assert s["bytes"].tolist() == [100.0, 220.0, 310.0]
    assert first_reaching(s["time"], s["accuracy"], 0.55) == 9.0
    assert first_reaching(s["time"], s["accuracy"], 0.95) is None
    assert staleness_values(RECORDS) == [0, 0, 1, 1, 2, 0, 3]
    assert rejections(RECORDS) == {"non_finite": 1, "stale": 2}  # the server's counters are cumulative


def test_bytes_are_summed_when_the_server_reports_only_per_version_bytes():
    recs = [VersionRecord(version=i + 1, accuracy=0.1 * i, upload_bytes=10) for i in range(3)]
    s = series(recs)
    assert s["bytes"].tolist() == [10.0, 20.0, 30.0]
    assert np.isnan(s["time"]).all()


def test_report_writes_plots_tensorboard_and_summary(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in RAW) + "\n")
    (tmp_path / "config.json").write_text(json.dumps({"aggregation.mode": "async",
                                                      "simulation.target_accuracy": 0.7}))
    md = write_report(tmp_path).read_text()
    for png in ("accuracy_vs_time.png", "accuracy_vs_bytes.png", "staleness_hist.png", "rejected.png"):
        assert (tmp_path / png).stat().st_size > 1000
        assert png in md
    assert "reached after 12.5 s virtual" in md
    assert "stale: 2" in md
    assert any((tmp_path / "tb").iterdir())


def test_compare_refuses_settings_with_different_devices_or_data(tmp_path):
    a = load_config(overrides={"simulation.devices": 4})
    b = load_config(overrides={"simulation.devices": 5, "aggregation.mode": "sync"})
    with pytest.raises(CompareError, match="devices"):
        compare(a, b, out_dir=tmp_path)


def test_gain_lines_show_base_final_and_what_the_federation_added():
    from fedge.simulations.report import gain_lines

    base = {"image+audio": 0.60, "image": 0.50, "audio": 0.55}
    final = {"image+audio": 0.80, "image": 0.70, "audio": 0.75}
    text = "\n".join(gain_lines(base, final))
    assert "| image+audio | 0.6000 | 0.8000 | +20.0 points |" in text
    assert "at least as accurate as each modality alone" in text
    assert "started at 0.6000 (fused); the federation ended at 0.8000: +20.0 points" in text
    worse = "\n".join(gain_lines(base, {**final, "image": 0.9}))
    assert "below image alone (0.9000)" in worse
