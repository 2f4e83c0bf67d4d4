"""Live audio sources (edge/live_audio.py): an ffmpeg lavfi generator and a FIFO written in real time stand in
for a microphone; device names; one-line errors for devices that do not exist or an ffmpeg that cannot
capture them; ffmpeg stopped when the consumer stops."""

from __future__ import annotations

import json
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedge.common.cli import build_app
from fedge.edge.audio_source import AudioSourceError, find_ffmpeg, open_audio
from fedge.edge.ingest import ingest
from fedge.edge.live_audio import LiveAudio, _input_devices, is_live_audio, open_live_audio, parse_live_audio
from fedge.edge.store import SampleStore

ROOT = Path(__file__).resolve().parents[2]

SINE = "lavfi:sine=frequency=440:sample_rate=44100"


def _peak_hz(y: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return float(np.argmax(spec) * sr / len(y))


def _wav_stream_header(sr: int, channels: int) -> bytes:
    """A 16-bit PCM WAV header with unknown sizes, as `arecord -t wav` writes to a pipe."""
    fmt = struct.pack("<HHIIHH", 1, channels, sr, sr * 2 * channels, 2 * channels, 16)
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", 0xFFFFFFFF))


def write_fifo_in_real_time(path: Path, seconds: float, sr: int = 22050, freq: float = 500.0,
                            step_s: float = 0.1) -> threading.Thread:
    """Start a thread that writes a stereo WAV stream of a tone into the FIFO at real-time pace."""

    def run() -> None:
        t = np.arange(int(sr * seconds)) / sr
        y = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16)
        pcm = np.stack([y, y], 1)
        step = int(sr * step_s)
        with open(path, "wb") as f:
            f.write(_wav_stream_header(sr, 2))
            for i in range(0, len(pcm), step):
                f.write(pcm[i : i + step].tobytes())
                f.flush()
                time.sleep(step_s)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


@pytest.fixture()
def fifo(tmp_path) -> Path:
    p = tmp_path / "mic.fifo"
    os.mkfifo(p)
    return p


def test_device_names_parse_to_ffmpeg_inputs(tmp_path, fifo):
    assert parse_live_audio("alsa:hw:1") == LiveAudio("alsa", "hw:1", "alsa:hw:1")
    assert parse_live_audio("hw:1") == LiveAudio("alsa", "hw:1", "hw:1")  # the bare form docs/audio.md names
    assert parse_live_audio("plughw:1,0").kind == "alsa"
    assert parse_live_audio("alsa:default").input_args() == ["-f", "alsa", "-i", "default"]
    assert parse_live_audio("pulse:default").input_args() == ["-f", "pulse", "-i", "default"]
    assert parse_live_audio(SINE).input_args()[:3] == ["-re", "-f", "lavfi"]  # paced like a device
    assert parse_live_audio(str(fifo)).kind == "fifo"
    assert parse_live_audio("clip.wav") is None and parse_live_audio("0") is None
    (tmp_path / "hw:1").write_bytes(b"x")  # an existing file always wins over a device name
    assert parse_live_audio(str(tmp_path / "hw:1")) is None
    assert is_live_audio("pulse:default") and is_live_audio(str(fifo)) and not is_live_audio(None)
    with pytest.raises(AudioSourceError, match="names no device"):
        parse_live_audio("alsa:")


def test_generator_streams_in_real_time_one_second_blocks_resampled(tmp_path):
    t0 = time.monotonic()
    src = open_audio(SINE, sr=16000, max_seconds=1.25)
    assert src.live and src.native_sr == 44100 and src.via == "ffmpeg-live"
    arrivals, parts = [], []
    for c in src.chunks():
        arrivals.append(time.monotonic() - t0)
        parts.append(c)
    y = np.concatenate(parts)
    assert len(y) == 20000 and src.seconds_out == pytest.approx(1.25) and src.error is None
    assert [len(p) for p in parts[1:-1]] == [16000] * (len(parts) - 2)  # whole seconds between the ends
    assert arrivals[-1] >= 0.7  # paced like a device (after ffmpeg's initial 0.5 s burst), not as fast as possible
    assert abs(_peak_hz(y, 16000) - 440) < 2


def test_fifo_written_in_real_time_is_read_as_it_arrives(fifo):
    writer = write_fifo_in_real_time(fifo, seconds=1.6)
    t0 = time.monotonic()
    src = open_audio(str(fifo), sr=16000)
    assert src.live and src.native_sr == 22050 and src.channels == 1  # ffmpeg downmixed the stereo stream
    first = None
    parts = []
    for c in src.chunks():
        first = time.monotonic() - t0 if first is None else first
        parts.append(c)
    total = time.monotonic() - t0
    writer.join(5)
    y = np.concatenate(parts)
    assert src.seconds_out == pytest.approx(1.6, abs=0.05) and src.error is None
    assert first is not None and first < total - 0.3  # the first second came before the writer finished
    assert abs(_peak_hz(y, 16000) - 500) < 2


def test_closing_a_live_source_stops_ffmpeg_whether_read_or_not():
    unread = open_audio(SINE)
    proc = unread._reader.proc  # type: ignore[union-attr]
    unread.close()
    assert proc.poll() is not None
    reading = open_audio(SINE)
    chunks = reading.chunks()
    next(chunks)
    proc = reading._active.proc  # type: ignore[union-attr]
    reading.close()
    assert proc.poll() is not None


def test_device_that_does_not_exist_is_one_line_naming_it():
    # with the imageio-ffmpeg build (no ALSA) this says so; with an ALSA-capable ffmpeg, that there is no hw:99
    with pytest.raises(AudioSourceError) as e:
        open_audio("alsa:hw:99")
    msg = str(e.value)
    assert "\n" not in msg and "alsa:hw:99" in msg
    with pytest.raises(AudioSourceError, match=r"cannot open live audio source lavfi:nosuchfilter") as e:
        open_audio("lavfi:nosuchfilter")
    assert "\n" not in str(e.value)
    with pytest.raises(AudioSourceError, match="unexpected sample rate 1000 Hz"):
        open_audio("lavfi:sine=sample_rate=1000")


def _fake_ffmpeg(tmp_path: Path, devices: str, stderr: str) -> str:
    exe = tmp_path / "ffmpeg"
    exe.write_text(f"""#!/bin/sh
if [ "$3" = "-devices" ]; then printf '%s' '{devices}'; exit 0; fi
printf '%s' '{stderr}' >&2
exit 1
""")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return str(exe)


@pytest.mark.parametrize(("spec", "devices", "stderr", "expect"), [
    ("alsa:hw:99",  # what Debian's ffmpeg 5.1 prints for a card that does not exist
     "Devices:\n D. = Demuxing supported\n --\n DE alsa            ALSA audio output\n",
     ("ALSA lib confmisc.c:165:(snd_config_get_card) Cannot get card index for 99\n"
     "[alsa @ 0x5574bbad78c0] cannot open audio device hw:99 (Invalid argument)\nhw:99: Input/output error\n"),
     ("cannot open audio device alsa:hw:99 (cannot open audio device hw:99 (Invalid argument); "
     "ALSA: Cannot get card index for 99)")),
    ("pulse:default",
     "Devices:\n ---\n DE pulse           Pulse audio output\n",
     "[in#0 @ 0x5566] Error opening input: No such process\nError opening input file default.\n",
     ("cannot open audio device pulse:default (Error opening input: No such process; is a PulseAudio (or "
     "PipeWire) server running for this user?)")),
])
def test_device_that_cannot_be_opened_is_one_line_with_ffmpegs_reason(tmp_path, spec, devices, stderr, expect):
    with pytest.raises(AudioSourceError) as e:
        open_audio(spec, ffmpeg=_fake_ffmpeg(tmp_path, devices, stderr))
    assert str(e.value) == expect


def test_an_ffmpeg_that_cannot_list_its_devices_is_asked_to_capture_anyway(tmp_path):
    exe = tmp_path / "ffmpeg"
    exe.write_text("#!/bin/sh\necho 'Unrecognized option devices.' >&2\nexit 1\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(AudioSourceError, match=r"^cannot open audio device alsa:hw:1 \(Unrecognized option"):
        open_audio("alsa:hw:1", ffmpeg=str(exe))


def _alsa_ffmpeg() -> str | None:
    exe = find_ffmpeg()
    return exe if exe is not None and "alsa" in (_input_devices(exe) or ()) else None


@pytest.mark.skipif(_alsa_ffmpeg() is None, reason="needs an ffmpeg with ALSA input (e.g. Debian's ffmpeg)")
def test_real_alsa_capture_from_the_null_device_and_a_missing_card():
    src = open_audio("alsa:null", max_seconds=0.5)  # alsa-lib's null PCM: no sound card needed
    assert src.native_sr > 0 and len(src.read_all()) == 8000
    with pytest.raises(AudioSourceError, match=r"^cannot open audio device alsa:hw:99 \(.*hw:99") as e:
        open_audio("alsa:hw:99")
    assert "\n" not in str(e.value)


def test_device_that_never_starts_is_an_error_and_its_ffmpeg_is_stopped(tmp_path):
    exe = tmp_path / "ffmpeg"
    exe.write_text('#!/bin/sh\nif [ "$3" = "-devices" ]; then printf " DE pulse  Pulse\\n"; exit 0; fi\n'
                   f'echo $$ > {tmp_path / "pid"}\nexec sleep 30\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(AudioSourceError, match=r"^live audio source gave nothing within 0.5 s: pulse:default$"):
        open_live_audio(LiveAudio("pulse", "default", "pulse:default"), sr=16000, chunk_s=1.0, min_sr=4000,
                        ffmpeg=str(exe), open_timeout_s=0.5)
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped


def test_ffmpeg_without_alsa_names_what_is_missing(tmp_path):
    devices = "Devices:\n D. = Demuxing supported\n ---\n D  lavfi           Libavfilter\n DE pulse   Pulse\n"
    with pytest.raises(AudioSourceError, match=r"has no 'alsa' input device.*or use pulse:DEVICE$"):
        open_audio("hw:1", ffmpeg=_fake_ffmpeg(tmp_path, devices, ""))
    assert find_ffmpeg() is not None


# ----------------------------------------------------------------------------------------- ingest
def _ingest_cli(*args: str):
    return CliRunner().invoke(build_app(), ["edge", "ingest", *args])


def test_microphone_only_ingest_of_a_live_source_for_a_bounded_duration(tmp_path):
    r = _ingest_cli("--audio", "lavfi:sine=frequency=440:sample_rate=16000", "--duration", "1.5",
                    "--store", str(tmp_path / "s"), "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["modalities"] == ["audio"] and rep["audio_seconds"] == pytest.approx(1.5) and rep["error"] is None
    samples = list(SampleStore(tmp_path / "s").iter_samples())
    assert len(samples) == rep["samples_stored"] >= 1
    assert all(s.modalities == ("audio",) and s.source == "lavfi:sine=frequency=440:sample_rate=16000"
               for s in samples)


def test_ingest_reads_a_fifo_written_in_real_time(tmp_path, fifo):
    writer = write_fifo_in_real_time(fifo, seconds=1.6)
    rep = ingest(audio=fifo, store=tmp_path / "s", label=2)
    writer.join(5)
    assert rep.audio_seconds == pytest.approx(1.6, abs=0.05) and rep.error is None
    assert rep.samples_stored >= 1 and all(s.label == 2 for s in SampleStore(tmp_path / "s").iter_samples())


def test_cli_device_that_does_not_exist_is_one_line(tmp_path):
    r = _ingest_cli("--audio", "alsa:hw:99", "--store", str(tmp_path / "s"))
    assert r.exit_code == 1
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "alsa:hw:99" in err[0] and "Traceback" not in r.stderr, r.stderr


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_a_live_ingest_cleanly_keeping_what_was_stored(tmp_path, sig):
    store = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "-m", "fedge.common.cli", "edge", "ingest", "--audio", SINE,
                          "--store", str(store), "--json", "--mic-stride", "0.5"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:  # until the live stream has given a few samples
            time.sleep(0.5)
            if store.exists() and len(SampleStore(store)) >= 2:
                break
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err.decode()
    rep = json.loads(out)
    assert rep["samples_stored"] >= 2 and "stopped on request; what was stored is kept" in rep["notes"]
    assert len(SampleStore(store)) == rep["samples_stored"]
