"""Labelled time spans of a recording: parse a CSV or JSON labels file, look up the label at a stream time.

A labels file lists ``start_s, end_s, label`` spans (seconds from the start of the recording, a class index).
CSV: one span per line, an optional header ``start_s,end_s,label`` (columns in any order), blank lines and
lines starting with ``#`` skipped. JSON: a list of ``{"start_s": ..., "end_s": ..., "label": ...}`` objects.
A span holds ``[start_s, end_s)``; spans may touch but not overlap; a time outside every span has no label.

Every problem is a :class:`LabelsError` whose message is one line naming the file and the span.
"""

from __future__ import annotations

import bisect
import csv
import io
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LabelSpan", "Labels", "LabelsError", "load_labels", "parse_labels"]

COLUMNS = ("start_s", "end_s", "label")


class LabelsError(ValueError):
    """A labels file that cannot be used; the message is one line naming the file and the span."""


@dataclass(frozen=True)
class LabelSpan:
    """One labelled span ``[start_s, end_s)``; ``where`` locates it in its file ("line 3", "item 2")."""

    start_s: float
    end_s: float
    label: int
    where: str

    def describe(self) -> str:
        return f"{self.where} ({self.start_s:g} s to {self.end_s:g} s, label {self.label})"


@dataclass(frozen=True)
class Labels:
    """The spans of one labels file, sorted by start time and checked (no overlaps)."""

    name: str  # the file, for messages
    spans: tuple[LabelSpan, ...]
    _starts: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", tuple(s.start_s for s in self.spans))  # frozen: set once here

    def label_at(self, t: float) -> int | None:
        """The label of the span holding time ``t`` (seconds), or None outside every span."""
        i = bisect.bisect_right(self._starts, t) - 1
        if i >= 0 and t < self.spans[i].end_s:
            return self.spans[i].label
        return None

    def error(self, span: LabelSpan, problem: str) -> LabelsError:
        return LabelsError(f"labels {self.name}: {span.describe()}: {problem}")

    def check_classes(self, num_classes: int) -> None:
        """Raise :class:`LabelsError` for the first label outside ``[0, num_classes)``."""
        for s in self.spans:
            if not 0 <= s.label < num_classes:
                raise self.error(s, f"label outside model.num_classes = {num_classes} (0..{num_classes - 1})")

    def past_end(self, duration_s: float, tolerance_s: float = 0.0) -> LabelsError | None:
        """The error for the first span that ends after a recording of ``duration_s`` seconds, or None."""
        for s in self.spans:
            if s.end_s > duration_s + tolerance_s:
                return self.error(s, f"ends after the end of the recording ({duration_s:.3f} s)")
        return None


def _number(v: Any, what: str, where: str, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise LabelsError(f"labels {name}: {where}: {what} {v!r} is not a number")
    try:
        x = float(v)
    except ValueError:
        raise LabelsError(f"labels {name}: {where}: {what} {v!r} is not a number") from None
    if not math.isfinite(x):
        raise LabelsError(f"labels {name}: {where}: {what} {v!r} is not a finite number")
    return x


def as_integer(v: object) -> int | None:
    """``v`` as an int (an int, an integral float, or a string of digits), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return int(v) if v.is_integer() else None
    try:
        return int(str(v).strip())
    except ValueError:
        return None


def _integer(v: Any, where: str, name: str) -> int:
    i = None if isinstance(v, float) else as_integer(v)  # a span's label is written as an integer
    if i is None:
        raise LabelsError(f"labels {name}: {where}: label {v!r} is not an integer")
    return i


def _span(start: Any, end: Any, label: Any, where: str, name: str) -> LabelSpan:
    a = _number(start, "start_s", where, name)
    b = _number(end, "end_s", where, name)
    lab = _integer(label, where, name)
    s = LabelSpan(a, b, lab, where)
    if a < 0 or b < 0:
        raise LabelsError(f"labels {name}: {s.describe()}: negative time")
    if b <= a:
        raise LabelsError(f"labels {name}: {s.describe()}: end_s must be after start_s")
    return s


def _names_hint(row: list[str]) -> str:
    """Two fields are most likely labels by file name, which are for images (:mod:`fedge.edge.images`)."""
    return " (filename,label rows label the images of a folder: --video photos/)" if len(row) == 2 else ""


def csv_records(text: str) -> list[tuple[int, list[str]]]:
    """The ``(line number, stripped cells)`` of a labels CSV, blank lines and ``#`` comments left out."""
    return [(i, [c.strip() for c in r]) for i, r in enumerate(csv.reader(io.StringIO(text)), 1)
            if any(c.strip() for c in r) and not r[0].lstrip().startswith("#")]


def read_json(text: str, name: str) -> Any:
    """``text`` parsed as JSON; a :class:`LabelsError` naming the file and line if it is not."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LabelsError(f"labels {name}: not valid JSON (line {e.lineno}): {e.msg}") from None


def read_text(path: str | Path) -> str:
    """A labels file's text (a UTF-8 byte-order mark dropped); a :class:`LabelsError` if it cannot be read."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LabelsError(f"labels {p}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LabelsError(f"labels {p}: cannot read: {e}") from None


def _csv_rows(text: str, name: str) -> list[LabelSpan]:
    rows = csv_records(text)
    order = list(range(3))
    if rows:
        i, first = rows[0]
        head = [c.lower() for c in first]
        try:
            float(head[0])
        except ValueError:  # a header
            if sorted(head) != sorted(COLUMNS):
                raise LabelsError(f"labels {name}: line {i}: header must name the columns "
                                  f"{','.join(COLUMNS)}, got {','.join(first)}{_names_hint(first)}") from None
            order = [head.index(c) for c in COLUMNS]
            rows = rows[1:]
    out = []
    for i, r in rows:
        if len(r) != 3:
            raise LabelsError(f"labels {name}: line {i}: expected 3 fields start_s,end_s,label, got {len(r)}"
                              f"{_names_hint(r)}")
        start, end, label = (r[k] for k in order)
        out.append(_span(start, end, label, f"line {i}", name))
    return out


def _json_rows(text: str, name: str) -> list[LabelSpan]:
    data = read_json(text, name)
    if not isinstance(data, list):
        raise LabelsError(f"labels {name}: expected a JSON list of {{start_s, end_s, label}} objects")
    out = []
    for i, item in enumerate(data, 1):
        where = f"item {i}"
        if not isinstance(item, dict) or set(item) != set(COLUMNS):
            raise LabelsError(f"labels {name}: {where}: expected an object with exactly the keys "
                              f"{', '.join(COLUMNS)}, got {item!r}"[:300])
        out.append(_span(item["start_s"], item["end_s"], item["label"], where, name))
    return out


def parse_labels(text: str, *, name: str, fmt: str | None = None, num_classes: int | None = None) -> Labels:
    """Parse a labels file's ``text`` (``fmt`` "csv" or "json"; None: JSON when it starts with ``[`` or ``{``).

    Raises
    ------
    LabelsError
        A malformed line or item, a negative time, an end not after its start, a label that is not an integer
        or (with ``num_classes``) outside ``[0, num_classes)``, or two overlapping spans.
    """
    if fmt is None:
        fmt = "json" if text.lstrip()[:1] in ("[", "{") else "csv"
    if fmt not in ("csv", "json"):
        raise ValueError(f"unknown labels format {fmt!r}")
    spans = sorted(_json_rows(text, name) if fmt == "json" else _csv_rows(text, name),
                   key=lambda s: (s.start_s, s.end_s))
    labels = Labels(name=name, spans=tuple(spans))
    for prev, s in itertools.pairwise(spans):
        if s.start_s < prev.end_s:
            raise labels.error(s, f"overlaps {prev.describe()}")
    if num_classes is not None:
        labels.check_classes(num_classes)
    return labels


def load_labels(path: str | Path, *, num_classes: int | None = None) -> Labels:
    """Read and parse a labels file (``.json``: JSON, ``.csv``: CSV, otherwise by content)."""
    p = Path(path)
    text = read_text(p)
    fmt = {".json": "json", ".csv": "csv"}.get(p.suffix.lower())
    return parse_labels(text, name=str(p), fmt=fmt, num_classes=num_classes)
