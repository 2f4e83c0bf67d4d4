"""Image folders and globs as a camera source (edge/images.py): listing and order, the keyframes' thumbnail
path, labels by file name, unreadable images; and ``fedge edge ingest --video FOLDER`` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
from typer.testing import CliRunner

from fedge.common.cli import build_app
from fedge.edge.images import is_image_source, open_images, read_name_labels
from fedge.edge.ingest import IngestError, ingest
from fedge.edge.keyframes import thumbnail
from fedge.edge.labels import LabelsError
from fedge.edge.sources import VideoSourceError
from fedge.edge.store import SampleStore

PHOTOS = (skimage.data.astronaut, skimage.data.chelsea, skimage.data.coffee, skimage.data.rocket)


def _photos(d: Path, names: tuple[str, ...] = ("b.png", "a.jpg", "c.JPG")) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        cv2.imwrite(str(d / name), PHOTOS[i % len(PHOTOS)]()[:, :, ::-1])
    return d


def test_folder_glob_and_file_list_images_in_name_order(tmp_path):
    d = _photos(tmp_path / "photos")
    (d / "notes.txt").write_text("not an image")
    _photos(d / "sub", ("d.jpg",))
    assert is_image_source(d) and is_image_source(f"{d}/*.jpg") and is_image_source(d / "a.jpg")
    assert not is_image_source(0) and not is_image_source(d / "notes.txt") and not is_image_source("clip.mp4")
    assert not is_image_source("rtsp://cam.local/live?channel=1") and not is_image_source("0")
    src = open_images(d)  # the folder's own images only
    assert [p.name for p in src.paths] == ["a.jpg", "b.png", "c.JPG"]
    deep = open_images(f"{d}/**/*.jpg")  # a recursive glob: names relative to its fixed folder
    assert [deep.key(p) for p in deep.paths] == ["a.jpg", "sub/d.jpg"]
    assert [p.name for p in open_images(d / "b.png").paths] == ["b.png"]
    with pytest.raises(VideoSourceError, match="no images .* in folder"):
        open_images(_empty(tmp_path))
    with pytest.raises(VideoSourceError, match="no image file matches"):
        open_images(f"{d}/*.gif")


def _empty(tmp_path: Path) -> Path:
    e = tmp_path / "empty"
    e.mkdir()
    (e / "readme.md").write_text("x")
    return e


def test_photo_takes_the_keyframe_thumbnail_path(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    big = cv2.resize(skimage.data.astronaut()[:, :, ::-1], (1024, 768))
    cv2.imwrite(str(d / "big.png"), big)
    cv2.imwrite(str(d / "grey.png"), skimage.data.camera())
    src = open_images(d)
    kf0, kf1 = src.keyframes(max_side=320)
    rgb, jpeg = thumbnail(big, max_side=320)
    assert src.paths[kf0.frame].name == "big.png" and kf0.image.shape == (240, 320, 3) and kf0.jpeg == jpeg
    np.testing.assert_array_equal(kf0.image, rgb)
    assert kf1.image.shape[2] == 3 and (kf0.time, kf1.time) == (0.0, 1.0) and (kf1.start, kf1.end) == (1.0, 2.0)
    assert src.images_read == 2 and src.skipped == []


def test_exif_orientation_is_applied_as_a_phone_photo_expects(tmp_path):
    from PIL import Image  # scikit-image's dependency

    img = Image.fromarray(np.zeros((40, 80, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "phone.jpg", exif=exif)
    (kf,) = open_images(tmp_path / "phone.jpg").keyframes()
    assert kf.image.shape == (80, 40, 3)


def test_unreadable_or_vanished_image_is_skipped_and_named(tmp_path):
    d = _photos(tmp_path / "p", ("a.jpg", "b.jpg", "c.jpg"))
    src = open_images(d)
    (d / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    (d / "c.jpg").unlink()
    assert [src.key(src.paths[kf.frame]) for kf in src.keyframes()] == ["a.jpg"]
    assert src.skipped == [f"{d / 'b.jpg'} (cannot decode)", f"{d / 'c.jpg'} (missing)"]


def test_labels_by_file_name_from_csv_with_or_without_header_and_json(tmp_path):
    (tmp_path / "h.csv").write_text("filename,label\na.jpg,3\nb.png, 1\n\n# a comment\n")
    (tmp_path / "n.csv").write_text("a.jpg,3\nb.png,1\n")
    (tmp_path / "l.json").write_text(json.dumps({"a.jpg": 3, "b.png": 1}))
    for f in ("h.csv", "n.csv", "l.json"):
        assert read_name_labels(tmp_path / f) == {"a.jpg": 3, "b.png": 1}
    src = open_images(_photos(tmp_path / "photos"))
    labels = src.labels({"a.jpg": 3, "c.JPG": 5, "b.png": 1}, "l.csv")
    assert [labels.label_at(float(i)) for i in range(3)] == [3, 1, 5]  # image i is stored at stream time i
    assert labels.label_at(3.0) is None
    partial = src.labels({"b.png": 2}, "l.csv")  # images the file does not name stay unlabeled
    assert [partial.label_at(float(i)) for i in range(3)] == [None, 2, None]


@pytest.mark.parametrize(("text", "match"), [
    ("a.jpg,0,2.5,3\n", r"line 1: expected 2 fields filename,label, got 4"),
    ("0,2.5,3\n", r"3 fields are time spans, for a video or audio stream"),
    ("a.jpg,3\nb.jpg,cat\n", r"line 2: label 'cat' of 'b.jpg' is not an integer"),
    ("a.jpg,-1\n", r"line 1: label -1 of 'a.jpg' is negative"),
    ("a.jpg,1\na.jpg,2\n", r"line 2: 'a.jpg' is given labels 1 and 2"),
    ("filename,label\n", r"holds no filename,label row"),
])
def test_bad_name_labels_are_one_line_errors(tmp_path, text, match):
    (tmp_path / "l.csv").write_text(text)
    with pytest.raises(LabelsError, match=match) as e:
        read_name_labels(tmp_path / "l.csv")
    assert "\n" not in str(e.value) and str(tmp_path / "l.csv") in str(e.value)


def test_label_names_must_match_images(tmp_path):
    d = _photos(tmp_path / "photos", ("a.jpg",))
    _photos(d / "x", ("a.jpg",))
    _photos(d / "y", ("a.jpg",))
    src = open_images(f"{d}/**/*.jpg")
    with pytest.raises(LabelsError, match=r"2 name\(s\) match no image in .*: zz.jpg, q.png"):
        src.labels({"zz.jpg": 1, "q.png": 2}, "l.csv")
    with pytest.raises(LabelsError, match=r"'a.jpg' names 2 images \(x/a.jpg, y/a.jpg\)"):
        open_images(f"{d}/*/*.jpg").labels({"a.jpg": 1}, "l.csv")
    assert src.labels({"x/a.jpg": 1, "y/a.jpg": 2}, "l.csv").label_at(1.0) == 1  # a.jpg, x/a.jpg, y/a.jpg


# ----------------------------------------------------------------------------------------- ingest
def _ingest_cli(*args: str):
    return CliRunner().invoke(build_app(), ["edge", "ingest", *args])


def _one_error_line(stderr: str) -> str:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def test_ingest_folder_stores_one_sample_per_image_labelled_by_file_name(tmp_path):
    d = _photos(tmp_path / "photos", ("a.jpg", "b.png", "c.JPG", "d.jpg"))
    (tmp_path / "labels.csv").write_text("filename,label\na.jpg,1\nc.JPG,2\n")
    r = _ingest_cli("--video", str(d), "--store", str(tmp_path / "s"), "--labels", str(tmp_path / "labels.csv"),
                    "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["samples_stored"] == 4 and rep["modalities"] == ["image"] and rep["error"] is None
    samples = list(SampleStore(tmp_path / "s").iter_samples())
    assert [Path(s.source or "").name for s in samples] == ["a.jpg", "b.png", "c.JPG", "d.jpg"]
    assert [s.label for s in samples] == [1, None, 2, None]  # d.jpg and b.png are not in the file
    assert all(s.modalities == ("image",) and s.audio is None for s in samples)
    # the stored JPEG is the keyframes' own thumbnail of the photo
    assert samples[0].image_jpeg == thumbnail(cv2.imread(str(d / "a.jpg")), max_side=320)[1]


def test_unreadable_image_is_skipped_named_and_fails_the_run_keeping_the_rest(tmp_path):
    d = _photos(tmp_path / "photos", ("a.jpg", "b.jpg", "c.jpg"))
    (d / "b.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    st = SampleStore(tmp_path / "s")
    st.put(image_jpeg=(d / "a.jpg").read_bytes(), label=0, split="train")  # stored before this run
    st.close()
    r = _ingest_cli("--video", f"{d}/*.jpg", "--store", str(tmp_path / "s"))
    assert r.exit_code == 1
    assert _one_error_line(r.stderr) == f"error: skipped 1 of 3 images that could not be read: {d / 'b.jpg'} " \
                                        "(cannot decode)"
    assert len(SampleStore(tmp_path / "s")) == 1 + 2
    r = _ingest_cli("--video", f"{d}/*.jpg", "--store", str(tmp_path / "s2"), "--json")
    rep = json.loads(r.stdout)
    assert rep["rejected"] == {"image:unreadable": 1} and rep["samples_rejected"] == 1
    assert SampleStore(tmp_path / "s2").stats()["rejected"] == {"image:unreadable": 1}  # `fedge edge store stats`


def test_labels_naming_an_image_not_there_fail_before_anything_is_stored(tmp_path):
    d = _photos(tmp_path / "photos", ("a.jpg", "b.jpg"))
    (tmp_path / "labels.csv").write_text("a.jpg,1\nmissing.jpg,2\n")
    r = _ingest_cli("--video", str(d), "--store", str(tmp_path / "s"), "--labels", str(tmp_path / "labels.csv"))
    assert r.exit_code == 2
    assert "1 name(s) match no image" in _one_error_line(r.stderr) and "missing.jpg" in r.stderr
    (tmp_path / "spans.csv").write_text("0,2.5,1\n")  # time spans are for streams, not for photos
    r = _ingest_cli("--video", str(d), "--store", str(tmp_path / "s"), "--labels", str(tmp_path / "spans.csv"))
    assert r.exit_code == 2 and "3 fields are time spans" in _one_error_line(r.stderr)
    assert len(SampleStore(tmp_path / "s")) == 0
    r = _ingest_cli("--video", f"{tmp_path}/nothing/*.png", "--store", str(tmp_path / "s"))
    assert r.exit_code == 1 and "no image file matches" in _one_error_line(r.stderr)


def test_label_outside_the_model_classes_names_the_image(tmp_path):
    d = _photos(tmp_path / "photos", ("a.jpg",))
    (tmp_path / "labels.json").write_text(json.dumps({"a.jpg": 7}))
    r = _ingest_cli("--video", str(d), "--store", str(tmp_path / "s"), "--labels", str(tmp_path / "labels.json"),
                    "--set", "model.num_classes=5")
    assert r.exit_code == 2 and "a.jpg" in _one_error_line(r.stderr) and "num_classes = 5" in r.stderr


def test_images_take_no_audio(tmp_path):
    d = _photos(tmp_path / "photos", ("a.jpg",))
    with pytest.raises(IngestError, match="images have no timeline"):
        ingest(video=d, audio=tmp_path / "x.wav", store=tmp_path / "s")


def test_rerun_over_a_folder_stores_only_new_or_changed_photos(tmp_path):
    d = _photos(tmp_path / "photos", ("a.jpg", "b.jpg"))
    assert ingest(video=d, store=tmp_path / "s").samples_stored == 2
    cv2.imwrite(str(d / "c.jpg"), skimage.data.rocket()[:, :, ::-1])  # a new photo
    again = ingest(video=d, store=tmp_path / "s")
    assert again.samples_stored == 1 and "2 image(s) stored by an earlier run were not stored again" in again.notes
    cv2.imwrite(str(d / "b.jpg"), skimage.data.coffee()[::2, ::2, ::-1])  # b.jpg replaced: another photo
    changed = ingest(video=d, store=tmp_path / "s")
    assert changed.samples_stored == 1
    assert sorted(Path(s.source or "").name for s in SampleStore(tmp_path / "s").iter_samples()) == \
        ["a.jpg", "b.jpg", "b.jpg", "c.jpg"]


def test_file_name_labels_given_for_a_video_say_what_they_are_for(tmp_path):
    (tmp_path / "names.csv").write_text("a.jpg,1\n")
    r = _ingest_cli("--video", str(tmp_path / "clip.avi"), "--store", str(tmp_path / "s"),  # checked first:
                    "--labels", str(tmp_path / "names.csv"))  # the video need not exist
    assert r.exit_code == 2
    assert "filename,label rows label the images of a folder" in _one_error_line(r.stderr)
