"""Live audio sources: a microphone (ALSA or PulseAudio), an ffmpeg ``lavfi`` generator, or a FIFO written in
real time, captured through an ``ffmpeg`` subprocess and delivered like the file sources of
:mod:`fedge.edge.audio_source` (mono float32 at the configured rate, in blocks of ``chunk_s`` seconds).

Source names (``--audio`` of ``fedge edge ingest`` and ``fedge edge run``):

* ``alsa:DEVICE`` — e.g. ``alsa:hw:1``, ``alsa:plughw:1,0``, ``alsa:default``; a bare ``hw:1`` / ``plughw:1,0``
  is read as ALSA too;
* ``pulse:DEVICE`` — e.g. ``pulse:default`` or a source name from ``pactl list sources short``;
* ``lavfi:GRAPH`` — an ffmpeg source filter read at real-time speed (``-re``), e.g.
  ``lavfi:sine=frequency=440:sample_rate=16000``: a live-like source without hardware;
* the path of a FIFO (named pipe) carrying any stream ffmpeg recognises from its first bytes, e.g. what
  ``arecord -t wav`` writes.

ffmpeg (found as for a video's audio track: ``$FEDGE_FFMPEG``, ``PATH``, the imageio-ffmpeg binary) captures
at the device's own rate, downmixes to mono and writes a WAV stream of 32-bit floats to a pipe; its header
gives the native rate, and the samples are resampled here by the same streaming polyphase filter as a file,
so a microphone feeds the model exactly what a recording of it would. Memory is one block. The stream has no
end of its own: it ends when the source does (a FIFO's writer closes, a device goes away), after
``max_seconds``, or when the consumer stops reading (ffmpeg is then killed).

Errors are one line naming the source: ffmpeg missing, an ffmpeg without the needed input device (the
imageio-ffmpeg build has PulseAudio and lavfi but no ALSA), a device that does not exist or cannot be
opened.
"""

from __future__ import annotations

import functools
import os
import re
import select
import stat
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import IO

from fedge.edge.audio_source import (
    AudioSource,
    AudioSourceError,
    FfmpegBlocks,
    check_rate,
    ffmpeg_error_lines,
    find_ffmpeg,
    read_exact,
)

__all__ = ["LiveAudio", "is_live_audio", "open_live_audio", "parse_live_audio"]

KINDS = ("alsa", "pulse", "lavfi")  # the ffmpeg input devices named by a prefix
OPEN_TIMEOUT_S = 15.0  # a device or generator that has not started within this is an error (a FIFO waits)
_BARE_ALSA = re.compile(r"^(plug)?hw:\S+$")  # `--audio hw:1` (docs/audio.md): an ALSA hardware device
_WAVE_FLOAT, _WAVE_EXTENSIBLE = 3, 0xFFFE
_ALSA_LIB = re.compile(r"^ALSA lib \S+?\(\w+\) (.+)$")  # alsa-lib's own stderr line: its reason is the tail
_NO_SERVER = ("No such process", "Connection refused", "Access denied")  # libpulse: no server to talk to


@dataclass(frozen=True)
class LiveAudio:
    """A parsed live source: ``kind`` is ``alsa``, ``pulse``, ``lavfi`` or ``fifo``; ``target`` what ffmpeg
    opens (device, filter graph or path); ``name`` the source as given."""

    kind: str
    target: str
    name: str

    def input_args(self) -> list[str]:
        """ffmpeg's input options for this source."""
        if self.kind == "fifo":
            return ["-probesize", "4096", "-analyzeduration", "0", "-i", self.target]
        if self.kind == "lavfi":  # a generator runs as fast as it can: -re paces it like a device
            return ["-re", "-f", "lavfi", "-i", self.target]
        return ["-f", self.kind, "-i", self.target]


def parse_live_audio(src: str) -> LiveAudio | None:
    """The live source ``src`` names, or None when it names a file (an existing regular file always wins).

    Raises
    ------
    AudioSourceError
        A prefix with nothing after it (``alsa:``).
    """
    try:
        st = os.stat(src)
    except (OSError, ValueError):
        st = None
    if st is not None:
        return LiveAudio("fifo", src, src) if stat.S_ISFIFO(st.st_mode) else None
    kind, sep, target = src.partition(":")
    if sep and kind in KINDS:
        if not target:
            raise AudioSourceError(f"live audio source {src!r} names no device (e.g. {kind}:default)")
        return LiveAudio(kind, target, src)
    if _BARE_ALSA.match(src):
        return LiveAudio("alsa", src, src)
    return None


def is_live_audio(src: str | None) -> bool:
    """Whether ``src`` names a live audio source (it never ends by itself, so the device agent restarts its
    ingest when it does)."""
    if not src:
        return False
    try:
        return parse_live_audio(src) is not None
    except AudioSourceError:
        return True  # a malformed device name: the ingest reports it


@functools.lru_cache(maxsize=8)
def _input_devices(exe: str) -> frozenset[str] | None:
    """Input devices (demuxers) of ``exe`` from ``ffmpeg -devices``; None when it cannot be asked."""
    try:
        r = subprocess.run([exe, "-hide_banner", "-nostdin", "-devices"], capture_output=True, text=True,
                           timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None  # it cannot even list them: let the capture itself say what is wrong
    names: set[str] = set()
    for line in r.stdout.splitlines():  # " DE pulse           Pulse audio output"; "video4linux2,v4l2"
        parts = line.split(None, 2)
        if len(parts) >= 2 and parts[1] != "=" and "D" in parts[0] and set(parts[0]) <= set("DE."):
            names.update(parts[1].split(","))
    return frozenset(names) or None


def open_live_audio(live: LiveAudio, *, sr: int, chunk_s: float, min_sr: int,
                    ffmpeg: str | None = None, open_timeout_s: float = OPEN_TIMEOUT_S) -> AudioSource:
    """Start ffmpeg on ``live`` and return the stream once its first header arrived.

    A FIFO waits for its writer without a time limit; a device or generator must start within
    ``open_timeout_s``.

    Raises
    ------
    AudioSourceError
        ffmpeg missing or lacking the input device, the device cannot be opened, an unexpected stream.
    """
    exe = find_ffmpeg(ffmpeg)
    if exe is None:
        raise AudioSourceError(f"live audio needs ffmpeg, which is not available (install ffmpeg or the "
                               f"imageio-ffmpeg package, or set FEDGE_FFMPEG): {live.name}")
    if live.kind != "fifo":
        devices = _input_devices(exe)
        if devices is not None and live.kind not in devices:
            hint = " or use pulse:DEVICE" if live.kind == "alsa" and "pulse" in devices else ""
            raise AudioSourceError(
                f"cannot capture {live.name}: the ffmpeg at {exe} has no '{live.kind}' input device "
                f"(`ffmpeg -devices`); point FEDGE_FFMPEG at an ffmpeg built with it (e.g. Debian's ffmpeg "
                f"package){hint}")
    cmd = [exe, "-hide_banner", "-nostdin", "-v", "error", *live.input_args(), "-map", "0:a:0", "-vn",
           "-ac", "1", "-c:a", "pcm_f32le", "-f", "wav", "-fflags", "+bitexact", "-flush_packets", "1", "pipe:1"]
    errf = tempfile.TemporaryFile()  # noqa: SIM115 - closed by FfmpegBlocks (or below on failure)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, stdin=subprocess.DEVNULL, bufsize=0)
    try:
        assert proc.stdout is not None
        rate, channels = _read_wav_header(proc.stdout, None if live.kind == "fifo" else open_timeout_s, live.name)
        if rate is None:
            try:  # ffmpeg closed its output: it is exiting
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            why = _open_error(ffmpeg_error_lines(errf)) or f"ffmpeg exit status {proc.returncode}"
            what = "audio device" if live.kind in ("alsa", "pulse") else "live audio source"
            if live.kind == "pulse" and any(s in why for s in _NO_SERVER):
                why += "; is a PulseAudio (or PipeWire) server running for this user?"
            raise AudioSourceError(f"cannot open {what} {live.name} ({why})")
        check_rate(rate, live.name, min_sr)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        errf.close()
        raise
    blocks = FfmpegBlocks(proc, errf, rate, chunk_s, f"live audio {live.kind} ended", first_error=True)
    return AudioSource(live.name, sr, rate, channels, None, 0, "ffmpeg-live", chunk_s, live=True, _reader=blocks)


def _open_error(lines: list[str]) -> str | None:
    """Why ffmpeg could not open the source, in one line: its own first message, with the reason alsa-lib
    printed before it (``ALSA lib confmisc.c:165:(snd_config_get_card) Cannot get card index for 99``)."""
    alsa = [m[1] for m in (_ALSA_LIB.match(ln) for ln in lines) if m]
    own = [ln for ln in lines if not ln.startswith("ALSA lib ")]
    if not own:
        return f"ALSA: {alsa[0]}" if alsa else None
    return f"{own[0]}; ALSA: {alsa[0]}" if alsa else own[0]


def _read_wav_header(f: IO[bytes], timeout_s: float | None, name: str) -> tuple[int | None, int]:
    """(native rate, channels) from the WAV header ffmpeg writes to a pipe (sizes unknown there), reading up to
    the start of the samples; (None, 0) when the stream ended first (ffmpeg failed).

    Raises
    ------
    AudioSourceError
        The header did not arrive within ``timeout_s`` (None: no limit), or it is not float PCM (never from
        this ffmpeg command).
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def take(n: int) -> bytes:
        if deadline is not None:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([f], [], [], max(0.0, left))
            if not ready:
                raise AudioSourceError(f"live audio source gave nothing within {timeout_s:g} s: {name}")
        return read_exact(f, n)

    head = take(12)
    if len(head) < 12:
        return None, 0
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise AudioSourceError(f"live audio: ffmpeg did not write a WAV stream: {name}")
    rate, channels = None, 0
    while True:
        ch = take(8)
        if len(ch) < 8:
            return None, 0
        cid, size = ch[:4], struct.unpack("<I", ch[4:])[0]
        if cid == b"data":
            break
        body = take(size + (size & 1))
        if cid == b"fmt ":
            tag, channels, rate = struct.unpack("<HHI", body[:8])
            bits = struct.unpack("<H", body[14:16])[0]
            if tag not in (_WAVE_FLOAT, _WAVE_EXTENSIBLE) or bits != 32:
                raise AudioSourceError(f"live audio: unexpected sample format {tag}/{bits} bit: {name}")
    if rate is None:
        raise AudioSourceError(f"live audio: WAV stream without a format chunk: {name}")
    return rate, channels
