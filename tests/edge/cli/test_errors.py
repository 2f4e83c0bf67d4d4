"""Every error of `fedge edge ingest` / `fedge edge keyframes` is one line: odd values fed to every option.

Through :func:`fedge.common.cli.run`, the console script's own entry point (what a user sees), in this process.
"""

import math
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import soundfile as sf

from fedge.common.cli import run
from fedge.edge.store import SampleStore

SR = 16000
NUMBERS = ["nan", "inf", "-inf", "1e308", "-1", "0", "", "99999999999999999999999"]


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli-media")
    vw = cv2.VideoWriter(str(d / "v.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 72))
    for photo in (skimage.data.astronaut(), skimage.data.coffee()):  # two sharp shots of a second each
        for _ in range(10):
            vw.write(cv2.resize(photo, (96, 72))[:, :, ::-1])
    vw.release()
    t = np.arange(2 * SR) / SR
    sf.write(d / "a.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SR)
    (d / "file").write_text("a file, not a folder")
    return {"video": d / "v.avi", "wav": d / "a.wav", "file": d / "file"}


def _run(capfd, *argv: str) -> tuple[int, list[str]]:
    code = run(list(argv))
    err = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    return code, err


def _assert_one_line(code: int, err: list[str], case: str) -> None:
    assert not any("Traceback" in ln for ln in err), f"{case}: traceback\n" + "\n".join(err)
    if code != 0:
        errors = [ln for ln in err if "error" in ln.lower()]
        assert len(errors) == 1 and len(errors[0]) < 400, f"{case}: {err}"


def _odd_paths(media: dict[str, Path], tmp: Path) -> list[str]:
    return ["", str(media["file"]), str(media["file"] / "sub"), str(tmp / "missing" / "x"), "/proc/version"]


INGEST_NUMERIC = ["--label", "--budget-mb", "--mic-stride", "--audio-offset", "--max-per-shot"]
INGEST_PATHS = ["--video", "--audio", "--store", "--labels", "--config"]


@pytest.mark.integration
def test_ingest_every_option_with_odd_values_fails_in_one_line(tmp_path, media, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty path is the working directory
    base = {"--video": str(media["video"]), "--audio": str(media["wav"]), "--store": str(tmp_path / "s")}
    cases: list[tuple[str, str]] = [(o, v) for o in INGEST_NUMERIC for v in NUMBERS]
    cases += [(o, v) for o in INGEST_PATHS for v in _odd_paths(media, tmp_path)]
    cases += [("--split", v) for v in ("", "nope")] + [("--align", v) for v in ("", "nope")]
    cases += [("--set", v) for v in ("", "x", "model.num_classes=nan", "nope.key=1")]
    for i, (opt, val) in enumerate(cases):
        args = {**base, "--store": str(tmp_path / f"s{i}"), opt: val}
        code, err = _run(capfd, "edge", "ingest", *[x for kv in args.items() for x in kv])
        _assert_one_line(code, err, f"{opt} {val!r}")
        if opt in ("--budget-mb", "--mic-stride", "--audio-offset") and val in ("nan", "inf", "-inf", ""):
            assert code != 0, f"{opt} {val!r} was accepted"
        if opt == "--budget-mb" and val in ("-1", "0"):
            assert code != 0, f"{opt} {val!r} was accepted"


@pytest.mark.integration
def test_keyframes_every_option_with_odd_values_fails_in_one_line(tmp_path, media, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = [(o, v) for o in ("--min-interval", "--max-interval", "--stride", "--max-side") for v in NUMBERS]
    cases += [("--out", v) for v in _odd_paths(media, tmp_path)]
    for opt, val in cases:
        code, err = _run(capfd, "edge", "keyframes", str(media["video"]), opt, val)
        _assert_one_line(code, err, f"{opt} {val!r}")
        if (val in ("nan", "inf", "-inf", "") and opt != "--out") or (opt == "--out" and val.startswith(str(media["file"]))):
            assert code != 0, f"{opt} {val!r} was accepted"
    for video in ("", str(media["file"]), str(tmp_path / "none.mp4")):
        code, err = _run(capfd, "edge", "keyframes", video)
        assert code != 0
        _assert_one_line(code, err, f"video {video!r}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: the case cannot happen as root")
def test_read_only_store_and_out_folders_fail_in_one_line(tmp_path, media, capfd):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        code, err = _run(capfd, "edge", "ingest", "--video", str(media["video"]), "--store", str(ro / "s"))
        assert code != 0
        _assert_one_line(code, err, "read-only store parent")
        code, err = _run(capfd, "edge", "keyframes", str(media["video"]), "--out", str(ro / "k"))
        assert code != 0
        _assert_one_line(code, err, "read-only --out")
    finally:
        ro.chmod(0o755)


def test_a_budget_too_small_for_one_sample_is_not_kept_for_later_ingests(tmp_path, media, capfd):
    store = tmp_path / "s"
    code, err = _run(capfd, "edge", "ingest", "--video", str(media["video"]), "--store", str(store),
                     "--budget-mb", "0.0001")
    assert code != 0 and "too small for one sample" in err[-1]
    assert SampleStore(store).budget_bytes is None  # the refused budget was not saved
    code, err = _run(capfd, "edge", "ingest", "--video", str(media["video"]), "--store", str(store))
    assert code == 0, err


def test_evictions_are_reported(tmp_path, media, capfd):
    store = tmp_path / "s"
    assert run(["edge", "ingest", "--video", str(media["video"]), "--audio", str(media["wav"]), "--store",
                str(store)]) == 0
    per = SampleStore(store).stats()["payload_bytes"]
    capfd.readouterr()
    import shutil  # a second recording (the same file again would be skipped by the resume point)
    again = {k: shutil.copy(media[k], tmp_path / f"again-{Path(media[k]).name}") for k in ("video", "wav")}
    code = run(["edge", "ingest", "--video", str(again["video"]), "--audio", str(again["wav"]), "--store",
                str(store), "--budget-mb", repr(math.ceil(per * 1.2) / 1e6)])
    out = capfd.readouterr()
    assert code == 0 and "evicted" in out.out + out.err
