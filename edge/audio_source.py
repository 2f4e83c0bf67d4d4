"""Audio sources: WAV/FLAC/OGG files (soundfile, or the stdlib ``wave`` module for WAV) and the audio track
of a video file (through an ``ffmpeg`` subprocess), read incrementally, downmixed to mono and resampled; live
sources (microphones, ffmpeg generators, FIFOs: :mod:`fedge.edge.live_audio`) are opened by the same
:func:`open_audio` and delivered the same way.

Memory stays bounded on an hour-long file: samples are read in blocks of ``chunk_s`` seconds and resampled
by a streaming polyphase filter (:class:`fedge.common.media.resample.StreamResampler`, equal to
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
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from fedge.common.media.resample import StreamResampler

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
        ``"soundfile"``, ``"wave"``, ``"ffmpeg"`` or ``"ffmpeg-live"``.
    samples_out : int
        Mono samples at ``sr`` delivered so far.
    error : str | None
        Set when a video's audio track broke part-way (truncated / corrupt) or a live source ended with an
        error: what decoded is kept, this line says where it stopped.
    live : bool
        A device, generator or FIFO (:mod:`fedge.edge.live_audio`): it has no end of its own.
    max_seconds : float | None
        Deliver at most this many seconds, then close the stream (None: to its end).
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
    live: bool = False
    max_seconds: float | None = None
    _reader: Iterator[np.ndarray | str] | None = field(default=None, repr=False)
    _active: Iterator[np.ndarray | str] | None = field(default=None, repr=False)  # the reader chunks() reads

    @property
    def seconds_out(self) -> float:
        """Seconds of audio delivered so far."""
        return self.samples_out / self.sr

    def chunks(self) -> Iterator[np.ndarray]:
        """Mono float32 chunks at ``sr`` (about ``chunk_s`` seconds each) until the end of the stream, or until
        ``max_seconds`` have been delivered (the reader, and a live source's ffmpeg, are then closed).

        Raises
        ------
        AudioSourceError
            Non-finite samples (naming the time), or a stream that holds no samples at all.
        """
        if self._reader is None:
            raise AudioSourceError(f"audio source already consumed: {self.name}")
        reader, self._reader = self._reader, None
        self._active = reader
        rs = StreamResampler(self.native_sr, self.sr)
        limit = None if self.max_seconds is None else round(self.max_seconds * self.sr)
        native_done = 0
        try:
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
                if limit is not None:
                    out = out[: max(0, limit - self.samples_out)]
                if len(out):
                    self.samples_out += len(out)
                    yield out
                if limit is not None and self.samples_out >= limit:
                    return
        finally:
            self._active = None
            close = getattr(reader, "close", None)
            if close is not None:  # stops a live source's ffmpeg when the consumer is done
                close()
        if native_done == 0:
            if self.live and self.error:  # the device failed before its first sample: ffmpeg's reason
                raise AudioSourceError(self.error)
            raise AudioSourceError(f"audio has zero length (no samples): {self.name}")
        tail = rs.flush()
        if limit is not None:
            tail = tail[: max(0, limit - self.samples_out)]
        if len(tail):
            self.samples_out += len(tail)
            yield tail

    def close(self) -> None:
        """Release the stream before its end (a live source's ffmpeg is stopped); idempotent."""
        for reader in (self._reader, self._active):
            close = getattr(reader, "close", None)
            if close is not None:
                close()
        self._reader = self._active = None

    def read_all(self) -> np.ndarray:
        """The whole signal (for short files and tests): mono float32 at ``sr``."""
        parts = list(self.chunks())
        return np.concatenate(parts) if parts else np.empty(0, np.float32)


def check_rate(rate: int, name: str, min_sr: int) -> None:
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
    max_seconds: float | None = None,
) -> AudioSource:
    """Open an audio file, the audio track of a video file, or a live source (a microphone, see
    :mod:`fedge.edge.live_audio`).

    Parameters
    ----------
    src : path of a WAV/FLAC/OGG file or of a video container with an audio track; or a live source:
        ``alsa:DEVICE`` (also a bare ``hw:1`` / ``plughw:1,0``), ``pulse:DEVICE``, ``lavfi:GRAPH``, a FIFO.
    sr : the rate to deliver (resampled with a polyphase filter when the file's rate differs).
    chunk_s : seconds per block read from the file.
    min_sr : lowest accepted native rate; a lower one is an error (its content would stop far below the
        mel bank's top band).
    ffmpeg : path of an ffmpeg executable (default: looked up, see the module docstring).
    max_seconds : deliver at most this many seconds (None: to the end; a live source runs until stopped).

    Raises
    ------
    AudioSourceError
        Missing file, directory, not audio, no audio track, unexpected sample rate, ffmpeg needed but absent;
        a live device that does not exist or that the ffmpeg found cannot capture.
    """
    name = str(src)
    if sr < 1:
        raise AudioSourceError(f"output sample rate must be >= 1 Hz, got {sr}")
    if max_seconds is not None and not (np.isfinite(max_seconds) and max_seconds > 0):
        raise AudioSourceError(f"max_seconds must be a finite number > 0, got {max_seconds}: {name}")
    from fedge.edge.live_audio import open_live_audio, parse_live_audio

    live = parse_live_audio(name)
    if live is not None:
        opened = open_live_audio(live, sr=sr, chunk_s=chunk_s, min_sr=min_sr, ffmpeg=ffmpeg)
        opened.max_seconds = max_seconds
        return opened
    if not os.path.exists(name):
        raise AudioSourceError(f"audio not found: {name}")
    if os.path.isdir(name):
        raise AudioSourceError(f"audio path is a directory, not a file: {name}")
    size = os.path.getsize(name)
    if size == 0:
        raise AudioSourceError(f"audio has zero length (empty file): {name}")
    for opener in (_open_soundfile, _open_wave):
        opened_file = opener(name, chunk_s)
        if opened_file is not None:
            native_sr, channels, duration, reader, via = opened_file
            check_rate(native_sr, name, min_sr)
            if duration == 0:
                raise AudioSourceError(f"audio has zero length (no samples): {name}")
            return AudioSource(name, sr, native_sr, channels, duration, size, via, chunk_s,
                               max_seconds=max_seconds, _reader=reader)
    exe = find_ffmpeg(ffmpeg)
    if exe is None:
        where = f" at {ffmpeg}" if ffmpeg else " (install ffmpeg or the imageio-ffmpeg package)"
        raise AudioSourceError(
            f"cannot read audio: not WAV/FLAC/OGG, and ffmpeg (needed for a video's audio track) is not "
            f"available{where}: {name}")
    native_sr, duration = _probe_ffmpeg(exe, name)
    check_rate(native_sr, name, min_sr)
    return AudioSource(name, sr, native_sr, 1, duration, size, "ffmpeg", chunk_s, max_seconds=max_seconds,
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
    # stderr in a file (closed by FfmpegBlocks): ffmpeg cannot block on a full pipe
    errf = tempfile.TemporaryFile()  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, bufsize=0)
    yield from FfmpegBlocks(proc, errf, rate, chunk_s, "audio track broken")


def read_exact(f: IO[bytes], n: int) -> bytes:
    """``n`` bytes from an unbuffered pipe, fewer only at its end."""
    parts: list[bytes] = []
    while n > 0:
        b = f.read(n)
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def ffmpeg_error_lines(errf: IO[bytes]) -> list[str]:
    """ffmpeg's error lines (from the file its stderr went to), without their ``[... @ 0x...]`` prefixes."""
    errf.seek(0)
    lines = [_FFMPEG_PREFIX.sub("", ln).strip() for ln in errf.read().decode(errors="replace").splitlines()]
    return [ln for ln in lines if ln]


def ffmpeg_error_line(errf: IO[bytes], *, first: bool = True) -> str | None:
    """ffmpeg's first (at opening, the most specific) or last error line."""
    lines = ffmpeg_error_lines(errf)
    return (lines[0] if first else lines[-1]) if lines else None


_FFMPEG_PREFIX = re.compile(r"^\[[^\]]*@ 0x[0-9a-f]+\]\s*")


class FfmpegBlocks:
    """Mono float32 blocks of ``chunk_s`` seconds from an ffmpeg process writing f32le to an unbuffered
    stdout; a str ``"<broken> (<ffmpeg's error>)"`` last when ffmpeg failed.

    :meth:`close` kills ffmpeg (if still running) and closes its pipes, also before the first block was read:
    a consumer that stops early, raises, or never starts leaves no process behind.
    """

    def __init__(self, proc: subprocess.Popen[bytes], errf: IO[bytes], rate: int, chunk_s: float, broken: str,
                 *, first_error: bool = False) -> None:
        self.proc, self.errf = proc, errf
        self._gen = self._blocks(4 * max(1, int(rate * chunk_s)), broken, first_error)

    def __iter__(self) -> FfmpegBlocks:
        return self

    def __next__(self) -> np.ndarray | str:
        return next(self._gen)

    def _blocks(self, n_bytes: int, broken: str, first_error: bool) -> Generator[np.ndarray | str, None, None]:
        assert self.proc.stdout is not None
        try:
            while True:
                data = read_exact(self.proc.stdout, n_bytes)
                cut = len(data) - len(data) % 4
                if cut:
                    yield np.frombuffer(data[:cut], np.float32).reshape(-1, 1)
                if len(data) < n_bytes:
                    break
            code = self.proc.wait()
            err = ffmpeg_error_line(self.errf, first=first_error)
            if code != 0 or err:
                yield f"{broken} ({err or f'ffmpeg exit status {code}'})"
        finally:
            self._release()

    def close(self) -> None:
        """Stop ffmpeg and release its pipes (idempotent)."""
        self._gen.close()
        self._release()

    def _release(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.errf.close()
