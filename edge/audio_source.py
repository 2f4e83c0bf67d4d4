"""Audio sources: WAV/FLAC/OGG files (soundfile, or the stdlib ``wave`` module for WAV) and the audio track
of a video file (through an ``ffmpeg`` subprocess), read incrementally, downmixed to mono and resampled.

Memory stays bounded on an hour-long file: samples are read in blocks of ``chunk_s`` seconds and resampled
by a streaming polyphase filter (:class:`common.media.audio.StreamResampler`, equal to
``scipy.signal.resample_poly`` on the whole signal). Errors are one line (:class:`AudioSourceError`): a missing
file, a file that holds no audio, zero-length audio, a sample rate outside the accepted range, non-finite
samples, a video whose audio track needs ffmpeg where none is installed.

ffmpeg is looked up in this order: the ``ffmpeg`` argument, ``$FEDGE_FFMPEG``, ``ffmpeg`` on ``PATH``, the
binary shipped by the ``imageio-ffmpeg`` wheel (installed with the ``edge`` extra).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.media.audio import StreamResampler

__all__ = ["MIN_SAMPLE_RATE", "AudioSource", "AudioSourceError", "find_ffmpeg", "open_audio"]

MIN_SAMPLE_RATE = 4000  # below this even the lowest mel bands of speech are missing
MAX_SAMPLE_RATE = 768000


class AudioSourceError(RuntimeError):
    """An audio source cannot be used; the message is one line naming the source."""


def find_ffmpeg(explicit: str | None = None) -> str | None:
    """Path of an ffmpeg executable, or None when there is none (see the module docstring for the order)."""
    if explicit:
        return explicit if (os.path.isfile(explicit) or shutil.which(explicit)) else None
    env = os.environ.get("FEDGE_FFMPEG")
    if env is not None:  # set (even empty): the only place to look, so that ffmpeg can be switched off
        return env if env and (os.path.isfile(env) or shutil.which(env)) else None
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg

        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        return None


@dataclass
class AudioSource:
    """An opened audio stream delivering mono float32 at ``sr``.

    Attributes
    ----------
    name : str
        The path as given.
    sr : int
        Output sample rate (the configured rate).
    native_sr : int
        The file's sample rate.
    channels : int
        Channels in the file (downmixed to mono by their mean).
    duration_s : float | None
        Announced duration, when the container tells it.
    bytes_in : int
        Size of the file on disk (raw bytes in).
    via : str
        ``"soundfile"``, ``"wave"`` or ``"ffmpeg"``.
    samples_out : int
        Mono samples at ``sr`` delivered so far.
    error : str | None
        Set when a video's audio track broke part-way (truncated / corrupt): what decoded is kept, this line
        says where it stopped.
    """

    name: str
    sr: int
    native_sr: int
    channels: int
    duration_s: float | None
    bytes_in: int
    via: str
    chunk_s: float = 1.0
    samples_out: int = 0
    error: str | None = None
    _reader: Iterator[np.ndarray | str] | None = field(default=None, repr=False)

    @property
    def seconds_out(self) -> float:
        """Seconds of audio delivered so far."""
        return self.samples_out / self.sr

    def chunks(self) -> Iterator[np.ndarray]:
        """Mono float32 chunks at ``sr`` (about ``chunk_s`` seconds each) until the end of the file.

        Raises
        ------
        AudioSourceError
            Non-finite samples (naming the time), or a file that holds no samples at all.
        """
        if self._reader is None:
            raise AudioSourceError(f"audio source already consumed: {self.name}")
        reader, self._reader = self._reader, None
        rs = StreamResampler(self.native_sr, self.sr)
        native_done = 0
        for block in reader:  # (n, channels) float32 at native_sr; a str: the stream broke here
            if isinstance(block, str):
                self.error = f"{block} after {native_done / self.native_sr:.3f} s of audio: {self.name}"
                break
            if block.size == 0:
                continue
            if not np.isfinite(block).all():
                bad = int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0]) + native_done
                raise AudioSourceError(
                    f"audio has non-finite samples at {bad / self.native_sr:.3f} s: {self.name}")
            native_done += len(block)
            mono = block.mean(axis=1, dtype=np.float64) if block.shape[1] > 1 else block[:, 0]
            out = rs.push(mono)
            if len(out):
                self.samples_out += len(out)
                yield out
        if native_done == 0:
            raise AudioSourceError(f"audio has zero length (no samples): {self.name}")
        tail = rs.flush()
        if len(tail):
            self.samples_out += len(tail)
            yield tail

    def read_all(self) -> np.ndarray:
        """The whole signal (for short files and tests): mono float32 at ``sr``."""
        parts = list(self.chunks())
        return np.concatenate(parts) if parts else np.empty(0, np.float32)


def _check_rate(rate: int, name: str, min_sr: int) -> None:
    if not min_sr <= rate <= MAX_SAMPLE_RATE:
        raise AudioSourceError(
            f"unexpected sample rate {rate} Hz (accepted: {min_sr}..{MAX_SAMPLE_RATE} Hz): {name}")


def open_audio(
    src: str | Path,
    *,
    sr: int = 16000,
    chunk_s: float = 1.0,
    min_sr: int = MIN_SAMPLE_RATE,
    ffmpeg: str | None = None,
) -> AudioSource:
    """Open an audio file or the audio track of a video file.

    Parameters
    ----------
    src : path of a WAV/FLAC/OGG file or of a video container with an audio track.
    sr : the rate to deliver (resampled with a polyphase filter when the file's rate differs).
    chunk_s : seconds per block read from the file.
    min_sr : lowest accepted native rate; a lower one is an error (its content would stop far below the
        mel bank's top band).
    ffmpeg : path of an ffmpeg executable (default: looked up, see the module docstring).

    Raises
    ------
    AudioSourceError
        Missing file, directory, not audio, no audio track, unexpected sample rate, ffmpeg needed but absent.
    """
    name = str(src)
    if not os.path.exists(name):
        raise AudioSourceError(f"audio not found: {name}")
    if os.path.isdir(name):
        raise AudioSourceError(f"audio path is a directory, not a file: {name}")
    if sr < 1:
        raise AudioSourceError(f"output sample rate must be >= 1 Hz, got {sr}")
    size = os.path.getsize(name)
    if size == 0:
        raise AudioSourceError(f"audio has zero length (empty file): {name}")
    for opener in (_open_soundfile, _open_wave):
        opened = opener(name, chunk_s)
        if opened is not None:
            native_sr, channels, duration, reader, via = opened
            _check_rate(native_sr, name, min_sr)
            if duration == 0:
                raise AudioSourceError(f"audio has zero length (no samples): {name}")
            return AudioSource(name, sr, native_sr, channels, duration, size, via, chunk_s, _reader=reader)
    exe = find_ffmpeg(ffmpeg)
    if exe is None:
        where = f" at {ffmpeg}" if ffmpeg else " (install ffmpeg or the imageio-ffmpeg package)"
        raise AudioSourceError(
            f"cannot read audio: not WAV/FLAC/OGG, and ffmpeg (needed for a video's audio track) is not "
            f"available{where}: {name}")
    native_sr, duration = _probe_ffmpeg(exe, name)
    _check_rate(native_sr, name, min_sr)
    return AudioSource(name, sr, native_sr, 1, duration, size, "ffmpeg", chunk_s,
                       _reader=_ffmpeg_blocks(exe, name, native_sr, chunk_s))


# ----------------------------------------------------------------------------------------- readers
def _open_soundfile(name: str, chunk_s: float):
    try:
        import soundfile as sf
    except (ImportError, OSError):  # soundfile or its libsndfile missing: the wave module reads WAV
        return None
    try:
        f = sf.SoundFile(name)
    except (RuntimeError, sf.LibsndfileError, TypeError):  # type: ignore[attr-defined]
        return None
    rate, ch, frames = int(f.samplerate), int(f.channels), int(f.frames)

    def blocks() -> Iterator[np.ndarray | str]:
        with f:
            n = max(1, int(rate * chunk_s))
            done = 0
            while True:
                try:
                    b = f.read(n, dtype="float32", always_2d=True)
                except (RuntimeError, sf.LibsndfileError) as e:  # type: ignore[attr-defined]
                    # a corrupt or truncated file: re-read the failed block in small steps to keep what decodes
                    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                    try:
                        f.seek(done)
                        while True:
                            b = f.read(max(1, n // 50), dtype="float32", always_2d=True)
                            if len(b) == 0:
                                break
                            done += len(b)
                            yield b
                    except (RuntimeError, sf.LibsndfileError):  # type: ignore[attr-defined]
                        pass
                    yield f"audio file broken ({msg})"
                    return
                if len(b) == 0:
                    return
                done += len(b)
                yield b

    return rate, ch, (frames / rate if rate > 0 else None), blocks(), "soundfile"


def _open_wave(name: str, chunk_s: float):
    try:
        w = wave.open(name, "rb")  # noqa: SIM115 - closed by the block generator below
    except (wave.Error, EOFError):
        return None
    rate, ch, width, frames = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
    if width not in (1, 2, 3, 4):
        w.close()
        return None

    def blocks() -> Iterator[np.ndarray]:
        with w:
            n = max(1, int(rate * chunk_s))
            while True:
                raw = w.readframes(n)
                if not raw:
                    return
                yield _pcm_to_float(raw, width).reshape(-1, ch)

    return rate, ch, (frames / rate if rate > 0 else None), blocks(), "wave"


def _pcm_to_float(raw: bytes, width: int) -> np.ndarray:
    if width == 1:  # unsigned 8-bit
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 3:  # 24-bit little endian: place in the top bytes of int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        i = (b[:, 0].astype(np.int32) << 8) | (b[:, 1].astype(np.int32) << 16) | (b[:, 2].astype(np.int32) << 24)
        return i.astype(np.float32) / 2**31
    dt = np.int16 if width == 2 else np.int32
    return np.frombuffer(raw, dt).astype(np.float32) / float(2 ** (8 * width - 1))


_RATE = re.compile(r"Audio:.*?(\d+) Hz")
_DURATION = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)")


def _probe_ffmpeg(exe: str, name: str) -> tuple[int, float | None]:
    """Native rate of the first audio stream and the container's duration, from ``ffmpeg -i``'s report."""
    try:
        r = subprocess.run([exe, "-hide_banner", "-nostdin", "-i", name], capture_output=True, text=True,
                           timeout=60, check=False)  # ffmpeg -i without an output always exits 1
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AudioSourceError(f"ffmpeg could not run ({e.__class__.__name__}): {name}") from None
    report = r.stderr
    if "Invalid data found" in report or "Stream #" not in report:
        raise AudioSourceError(f"not an audio or video file ffmpeg can read: {name}")
    m = _RATE.search(report)
    if m is None:
        raise AudioSourceError(f"no audio track in {name}")
    d = _DURATION.search(report)
    duration = None if d is None else int(d[1]) * 3600 + int(d[2]) * 60 + float(d[3])
    return int(m[1]), duration


def _ffmpeg_blocks(exe: str, name: str, rate: int, chunk_s: float) -> Iterator[np.ndarray | str]:
    """Decode the first audio track to mono float32 at its native rate, block by block (ffmpeg downmixes by
    averaging the channels, as the file readers do)."""
    cmd = [exe, "-hide_banner", "-nostdin", "-v", "error", "-i", name, "-map", "0:a:0", "-vn",
           "-ac", "1", "-f", "f32le", "-acodec", "pcm_f32le", "pipe:1"]
    errf = tempfile.TemporaryFile()  # noqa: SIM115 - closed below; a file: ffmpeg cannot block on a full pipe
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf)
    assert proc.stdout is not None
    n_bytes = 4 * max(1, int(rate * chunk_s))
    pending = b""
    try:
        while True:
            data = proc.stdout.read(n_bytes)
            if not data:
                break
            data = pending + data
            cut = len(data) - len(data) % 4
            pending = data[cut:]
            yield np.frombuffer(data[:cut], np.float32).reshape(-1, 1)
        code = proc.wait()
        errf.seek(0)
        err = errf.read().decode(errors="replace").strip().splitlines()
        if code != 0 or err:
            yield f"audio track broken ({err[-1] if err else f'ffmpeg exit status {code}'})"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        errf.close()
