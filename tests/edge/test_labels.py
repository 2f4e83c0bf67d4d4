"""Labelled time spans (edge/labels.py) and ``fedge edge ingest --labels``: parsing, look-up, and every bad input
as a one-line error that loses nothing already stored."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from fedge.common.cli import build_app
from fedge.edge.labels import LabelsError, load_labels, parse_labels
from fedge.edge.store import SampleStore

SR = 16000


def _cli(*args: str):
    return CliRunner().invoke(build_app(), ["edge", "ingest", *args])


def _errors(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]


@pytest.fixture(scope="module")
def wav(tmp_path_factory):
    """8 s of a tone (microphone-only)."""
    p = tmp_path_factory.mktemp("labels") / "tone.wav"
    t = np.arange(8 * SR) / SR
    sf.write(p, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SR)
    return p


# ----------------------------------------------------------------------------------------- parsing
def test_csv_with_or_without_header_and_json_give_the_same_spans(tmp_path):
    rows = [(0.0, 1.5, 2), (1.5, 3.0, 4), (5.0, 6.0, 0)]
    plain = "\n".join(f"{a},{b},{c}" for a, b, c in reversed(rows))  # any order
    header = "label, start_s, end_s\n# a comment\n\n" + "\n".join(f"{c},{a},{b}" for a, b, c in rows)
    (tmp_path / "s.json").write_text(json.dumps([{"start_s": a, "end_s": b, "label": c} for a, b, c in rows]))
    (tmp_path / "s.txt").write_text(plain)
    got = [parse_labels(plain, name="a"), parse_labels(header, name="b"), load_labels(tmp_path / "s.json"),
           load_labels(tmp_path / "s.txt")]
    for labels in got:
        assert [(s.start_s, s.end_s, s.label) for s in labels.spans] == rows


def test_a_time_takes_the_label_of_its_span_and_none_outside_every_span():
    labels = parse_labels("0,1.5,2\n1.5,3,4\n5,6,0\n", name="x")
    assert [labels.label_at(t) for t in (0.0, 1.49, 1.5, 2.9, 3.0, 4.0, 5.5, 6.0, -0.1)] == \
        [2, 2, 4, 4, None, None, 0, None, None]


@pytest.mark.parametrize("text, expect", [
    ("0,1,2\n-1,0.5,3", "line 2 .*negative time"),
    ("2,1,3", "line 1 .*end_s must be after start_s"),
    ("1,1,3", "line 1 .*end_s must be after start_s"),
    ("0,1,cat", "line 1: label 'cat' is not an integer"),
    ("0,1,1.5", "line 1: label '1.5' is not an integer"),
    ("0,x,1", "line 1: end_s 'x' is not a number"),
    ("0,inf,1", "not a finite number"),
    ("0,2,1\n1,3,2", r"line 2 \(1 s to 3 s, label 2\): overlaps line 1 \(0 s to 2 s, label 1\)"),
    ("0,1,10", "label outside model.num_classes = 10"),
    ("0,1,-1", "label outside model.num_classes = 10"),
    ("0,1", "line 1: expected 3 fields"),
    ("from,to,class\n0,1,1", "header must name the columns start_s,end_s,label"),
    ('[{"start_s": 0, "end_s": 1, "label": 1.0}]', "item 1: label 1.0 is not an integer"),
    ('[{"start_s": 0, "end_s": 1}]', "item 1: expected an object with exactly the keys"),
    ('[{"start_s": 0, "end_s": 1, "label": true}]', "label True is not an integer"),
    ('{"start_s": 0}', "expected a JSON list"),
    ("[1, 2", "not valid JSON"),
])
def test_bad_labels_files_are_one_line_errors_naming_file_and_span(text, expect):
    with pytest.raises(LabelsError, match=expect) as e:
        parse_labels(text, name="spans.csv", num_classes=10)
    assert str(e.value).startswith("labels spans.csv") and "\n" not in str(e.value)


def test_a_span_past_the_end_of_the_recording_is_found_once_its_length_is_known():
    labels = parse_labels("0,4,1\n4,8.2,2", name="x")
    assert labels.past_end(8.2) is None and labels.past_end(8.0, tolerance_s=0.04) is not None
    assert "line 2 (4 s to 8.2 s, label 2): ends after the end of the recording (8.000 s)" in \
        str(labels.past_end(8.0))


# ----------------------------------------------------------------------------------------- CLI
def test_cli_labels_each_sample_by_its_span_and_leaves_the_rest_unlabeled(tmp_path, wav):
    spans = tmp_path / "spans.csv"
    spans.write_text("start_s,end_s,label\n0,2,3\n2,4,5\n6,8,9\n")
    r = _cli("--audio", str(wav), "--store", str(tmp_path / "s"), "--labels", str(spans), "--mic-stride", "0.5")
    assert r.exit_code == 0, r.output
    got = [(s.stream_time, s.label) for s in SampleStore(tmp_path / "s").iter_samples()]
    assert len(got) == 16  # a window centred every 0.5 s from 0.256 s: its centre decides
    for t, lab in got:
        assert lab == (3 if t < 2 else 5 if t < 4 else None if t < 6 else 9)


@pytest.mark.parametrize("case", ["negative", "order", "not-int", "overlap", "classes", "set-classes", "label",
                                  "both", "missing"])
def test_cli_bad_labels_fail_in_one_line_before_anything_is_stored(tmp_path, wav, case):
    spans = tmp_path / "spans.csv"
    spans.write_text({"negative": "-0.5,1,1", "order": "3,2,1", "not-int": "0,1,one", "overlap": "0,2,1\n1,3,1",
                      "classes": "0,1,10", "set-classes": "0,1,7"}.get(case, "0,1,1"))
    store = tmp_path / "s"
    _cli("--audio", str(wav), "--store", str(store), "--label", "1")  # what is already there stays
    before = len(SampleStore(store))
    args = {"set-classes": ["--labels", str(spans), "--set", "model.num_classes=5"],
            "label": ["--label", "10"], "both": ["--label", "1", "--labels", str(spans)],
            "missing": ["--labels", str(tmp_path / "nope.csv")]}.get(case, ["--labels", str(spans)])
    r = _cli("--audio", str(wav), "--store", str(store), *args)
    expect = {"negative": "negative time", "order": "end_s must be after start_s", "not-int": "not an integer",
              "overlap": "overlaps", "classes": "outside model.num_classes = 10",
              "set-classes": "outside model.num_classes = 5", "label": "--label 10 is outside model.num_classes",
              "both": "not both", "missing": "file not found"}[case]
    assert r.exit_code != 0 and len(_errors(r)) == 1 and expect in _errors(r)[0], r.stderr
    if case not in ("label", "both"):
        assert "spans.csv" in _errors(r)[0] or "nope.csv" in _errors(r)[0]
    assert "Traceback" not in r.stderr and len(SampleStore(store)) == before > 0


def test_cli_span_past_the_end_is_an_error_after_ingest_and_stored_samples_stay(tmp_path, wav):
    spans = tmp_path / "spans.json"
    spans.write_text(json.dumps([{"start_s": 0, "end_s": 4, "label": 1}, {"start_s": 4, "end_s": 9.5, "label": 2}]))
    r = _cli("--audio", str(wav), "--store", str(tmp_path / "s"), "--labels", str(spans))
    assert r.exit_code == 1
    assert _errors(r) == [(f"error: labels {spans}: item 2 (4 s to 9.5 s, label 2): ends after the end of the "
                           "recording (8.000 s)")]
    assert [s.label for s in SampleStore(tmp_path / "s").iter_samples()] == [1] * 4 + [2] * 4
