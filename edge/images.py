"""Image folders and globs as a camera source: one sample per photo, and labels by file name.

``fedge edge ingest --video photos/`` (a folder: its images, not its subfolders), ``--video 'photos/*.jpg'``
(a glob, ``**`` for subfolders) or ``--video photo.jpg`` stores one sample per image, in file-name order. Each
image is decoded by OpenCV (EXIF orientation applied, grey and 16-bit images made 8-bit BGR) and goes through
the keyframes' own thumbnail and JPEG step (:func:`fedge.edge.keyframes.thumbnail`), so training sees a photo exactly
as it would see a keyframe; the ingest's quality gate then judges it like a keyframe. Image ``i`` (in order)
gets stream time ``i`` seconds: photos have no timeline, and the index keeps them apart and in order.

Labels by file name (``--labels``): a CSV of ``filename,label`` rows (a header row is optional) or a JSON
object ``{"filename": label}``. A name is the path relative to the folder (for a glob: to its fixed leading
folder), or just the file's name when that is unique among the images. Images the file does not name are
stored unlabeled; a name that matches no image, a label that is not a non-negative integer, or a name given
two different labels is a one-line error before anything is stored.

An image that cannot be read when its turn comes (deleted meanwhile, truncated, not an image after all) is
skipped and named in :attr:`ImageSource.skipped`; the rest is stored (the ingest reports the skipped ones as
its error and exits non-zero, keeping what was stored). A photo is a recording of its own for
:mod:`fedge.edge.resume`: one stored by an earlier run (same path, size and modification time) is not stored again,
so a rerun over a folder that gained photos stores only the new ones.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import cv2

from fedge.edge.keyframes import Keyframe, thumbnail
from fedge.edge.labels import Labels, LabelsError, LabelSpan, as_integer, csv_records, read_json, read_text
from fedge.edge.sources import VideoSourceError

__all__ = ["IMAGE_SUFFIXES", "ImageSource", "is_image_source", "open_images", "read_name_labels"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def is_image_source(src: str | int | Path | None) -> bool:
    """Whether ``src`` names images rather than a video: a folder, a glob pattern, or one image file."""
    if src is None or isinstance(src, int):
        return False
    s = str(src)
    if s.isdigit() or "://" in s:  # a camera index, or a stream URL (whose query may hold '?')
        return False
    if os.path.isdir(s):
        return True
    if os.path.exists(s):
        return Path(s).suffix.lower() in IMAGE_SUFFIXES
    return glob.has_magic(s)


@dataclass
class ImageSource:
    """Images in file-name order, read one at a time.

    Attributes
    ----------
    name : str
        The folder, glob or file as given.
    paths : list[Path]
        The images, sorted by their path.
    root : Path
        What label names are relative to.
    skipped : list[str]
        ``"<path> (<why>)"`` for each image that could not be read.
    images_read : int
        Images decoded so far.
    """

    name: str
    paths: list[Path]
    root: Path
    skipped: list[str] = field(default_factory=list)
    images_read: int = 0

    def key(self, path: Path) -> str:
        """The image's name for labels: its path relative to :attr:`root`, with ``/``."""
        try:
            return PurePosixPath(path.relative_to(self.root)).as_posix()
        except ValueError:
            return path.as_posix()

    def keyframe(self, i: int, *, max_side: int = 320, jpeg_quality: int = 90) -> Keyframe | None:
        """Image ``i`` as a keyframe: ``frame`` = ``i``, ``time`` = ``start`` = ``i`` seconds, ``end`` one second
        later; None when it cannot be read (named in :attr:`skipped`)."""
        path = self.paths[i]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
        if bgr is None or bgr.size == 0:
            self.skipped.append(f"{path} ({'cannot decode' if path.is_file() else 'missing'})")
            return None
        self.images_read += 1
        rgb, jpeg = thumbnail(bgr, max_side=max_side, jpeg_quality=jpeg_quality)
        # a photo is the keyframe of its own one-image shot
        return Keyframe(frame=i, time=float(i), score=1.0, image=rgb, jpeg=jpeg, start=float(i), end=float(i + 1))

    def keyframes(self, *, max_side: int = 320, jpeg_quality: int = 90) -> Iterator[Keyframe]:
        """:meth:`keyframe` of every readable image, in order."""
        for i in range(len(self.paths)):
            kf = self.keyframe(i, max_side=max_side, jpeg_quality=jpeg_quality)
            if kf is not None:
                yield kf

    def labels(self, names: dict[str, int], source: str) -> Labels:
        """The labels of :func:`read_name_labels` as time spans: image ``i`` (in order) holds ``[i, i + 1)``,
        the stream time it is stored at, so the ingest looks labels up as for a recording.

        Raises
        ------
        LabelsError
            A name matches no image (or several by file name alone), or one image gets two labels.
        """
        index = {self.key(p): i for i, p in enumerate(self.paths)}
        by_base: dict[str, list[str]] = {}
        for k in index:
            by_base.setdefault(PurePosixPath(k).name, []).append(k)
        spans: dict[str, LabelSpan] = {}
        unknown: list[str] = []
        for name, label in names.items():
            norm = PurePosixPath(os.path.normpath(name).replace(os.sep, "/")).as_posix()
            if norm in index:
                key = norm
            elif len(by_base.get(norm, [])) == 1:
                key = by_base[norm][0]
            elif norm in by_base:
                raise LabelsError(f"labels {source}: {name!r} names {len(by_base[norm])} images "
                                  f"({', '.join(by_base[norm][:3])}): give the path relative to {self.root}")
            else:
                unknown.append(name)
                continue
            if key in spans and spans[key].label != label:
                raise LabelsError(f"labels {source}: image {key} is given labels {spans[key].label} and {label}")
            spans[key] = LabelSpan(float(index[key]), float(index[key] + 1), label, key)
        if unknown:
            more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
            raise LabelsError(f"labels {source}: {len(unknown)} name(s) match no image in {self.name}: "
                              f"{', '.join(unknown[:3])}{more}")
        return Labels(name=source, spans=tuple(sorted(spans.values(), key=lambda s: s.start_s)))


def open_images(src: str | Path) -> ImageSource:
    """List the images ``src`` names (see the module docstring).

    Raises
    ------
    VideoSourceError
        No image in the folder, nothing matches the glob, or a file that is not an image.
    """
    s = str(src)
    if os.path.isdir(s):
        root = Path(s)
        paths = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not paths:
            raise VideoSourceError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {s}")
    elif os.path.exists(s):
        root = Path(s).parent
        if Path(s).suffix.lower() not in IMAGE_SUFFIXES:
            raise VideoSourceError(f"not an image file ({', '.join(sorted(IMAGE_SUFFIXES))}): {s}")
        paths = [Path(s)]
    else:
        root = _glob_root(s)
        paths = [Path(p) for p in glob.glob(s, recursive=True)
                 if os.path.isfile(p) and Path(p).suffix.lower() in IMAGE_SUFFIXES]
        if not paths:
            raise VideoSourceError(f"no image file matches {s}")
    return ImageSource(name=s, paths=sorted(paths), root=root)


def _glob_root(pattern: str) -> Path:
    """The pattern's leading folders without wildcards (``photos/2024/*.jpg`` -> ``photos/2024``)."""
    fixed: list[str] = []
    for part in Path(pattern).parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def read_name_labels(path: str | Path) -> dict[str, int]:
    """``{file name: label}`` from a ``filename,label`` CSV (header optional) or a JSON object.

    Raises
    ------
    LabelsError
        Missing or unreadable file, a row without exactly two fields, a label that is not a non-negative
        integer, one name with two labels, no row at all.
    """
    p = Path(path)
    text = read_text(p)
    rows: list[tuple[str, str, object]] = []  # (where, file name, label as given)
    if p.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        obj = read_json(text, str(p))
        if not isinstance(obj, dict):
            raise LabelsError(f"labels {p}: images take a JSON object {{\"file name\": label}}")
        rows = [(f"item {k!r}", str(k), v) for k, v in obj.items()]
    else:
        first = True
        for n, cells in csv_records(text):
            if len(cells) != 2:
                span = " (3 fields are time spans, for a video or audio stream)" if len(cells) == 3 else ""
                raise LabelsError(f"labels {p}: line {n}: expected 2 fields filename,label{span}, "
                                  f"got {len(cells)}")
            if first and as_integer(cells[1]) is None:
                first = False
                continue  # a header
            first = False
            rows.append((f"line {n}", cells[0], cells[1]))
    out: dict[str, int] = {}
    for where, name, raw in rows:
        label = as_integer(raw)
        if not name:
            raise LabelsError(f"labels {p}: {where}: empty file name")
        if label is None:
            raise LabelsError(f"labels {p}: {where}: label {raw!r} of {name!r} is not an integer")
        if label < 0:
            raise LabelsError(f"labels {p}: {where}: label {label} of {name!r} is negative")
        if out.get(name, label) != label:
            raise LabelsError(f"labels {p}: {where}: {name!r} is given labels {out[name]} and {label}")
        out[name] = label
    if not out:
        raise LabelsError(f"labels {p}: holds no filename,label row")
    return out
