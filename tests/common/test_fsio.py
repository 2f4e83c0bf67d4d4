"""Crash-safe writes: whole or nothing, private from creation, no torn file under concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from fedge.common.fsio import append_jsonl, atomic_dir, atomic_path, atomic_write, read_jsonl


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_atomic_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write(target, "old")
    atomic_write(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert os.listdir(target.parent) == ["state.json"]


def test_an_error_inside_atomic_path_leaves_the_target_unchanged_and_no_temporary(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="crash"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half of the new")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["weights.bin"]


def test_a_failing_write_leaves_the_target_unchanged_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "index.json"
    atomic_write(target, "{}")

    def no_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(target, '{"latest": "v2"}')
    assert target.read_text() == "{}"
    assert os.listdir(tmp_path) == ["index.json"]


def test_private_files_are_0600_from_creation_not_only_at_the_end(tmp_path):
    target = tmp_path / "ca.key"
    with atomic_path(target, mode=0o600) as tmp:
        assert _mode(tmp) == 0o600  # before a byte is written
        tmp.write_bytes(b"secret")
    assert _mode(target) == 0o600
    atomic_write(target, b"secret 2", mode=0o600)
    assert _mode(target) == 0o600


def test_atomic_write_writes_into_a_temporary_that_already_has_the_mode(tmp_path, monkeypatch):
    seen: list[int] = []
    real_write_bytes = Path.write_bytes

    def spy(self, data):
        seen.append(_mode(self))
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", spy)
    atomic_write(tmp_path / "server.key", b"k", mode=0o600)
    atomic_write(tmp_path / "server.pem", b"c")
    assert seen == [0o600, 0o644]
    assert _mode(tmp_path / "server.pem") == 0o644


def test_atomic_path_keeps_the_suffix_so_np_savez_writes_the_temporary_itself(tmp_path):
    target = tmp_path / "subset.npz"
    with atomic_path(target) as tmp:
        assert tmp.suffix == ".npz" and tmp.parent == tmp_path
        np.savez(tmp, x=np.arange(3))
    with np.load(target) as z:
        np.testing.assert_array_equal(z["x"], np.arange(3))
    assert os.listdir(tmp_path) == ["subset.npz"]


def _write_many(path: str, tag: int, n: int) -> None:
    for i in range(n):
        atomic_write(path, json.dumps({"tag": tag, "i": i, "pad": "x" * 20000 * (1 + tag)}))


def test_concurrent_writers_in_two_processes_never_leave_a_torn_file(tmp_path):
    target = tmp_path / "shared.json"
    atomic_write(target, json.dumps({"tag": -1, "i": 0, "pad": ""}))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(str(target), t, 40)) for t in (0, 1)]
    for p in procs:
        p.start()
    seen = set()
    while any(p.is_alive() for p in procs):
        rec = json.loads(target.read_text())  # a torn file would not parse
        assert len(rec["pad"]) in (0, 20000, 40000)
        seen.add(rec["tag"])
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert json.loads(target.read_text())["i"] == 39
    assert os.listdir(tmp_path) == ["shared.json"]


def test_concurrent_writers_in_threads_use_distinct_temporaries(tmp_path):
    target = tmp_path / "state.bin"
    errors: list[BaseException] = []

    def run(tag: int) -> None:
        try:
            for _ in range(50):
                atomic_write(target, bytes([tag]) * 4096)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    data = target.read_bytes()
    assert len(data) == 4096 and len(set(data)) == 1
    assert os.listdir(tmp_path) == ["state.bin"]


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
    ledger = tmp_path / "updates.jsonl"
    append_jsonl(ledger, {"n": 1})
    append_jsonl(ledger, {"n": 2})
    with open(ledger, "a") as f:
        f.write('{"n": 3, "bytes"')  # the crash mid-append
    assert read_jsonl(ledger) == [{"n": 1}, {"n": 2}]


def test_an_append_after_a_torn_line_stays_whole(tmp_path):
    ledger = tmp_path / "events.jsonl"
    append_jsonl(ledger, {"n": 1})
    with open(ledger, "a") as f:
        f.write('{"n": 2, "bro')
    append_jsonl(ledger, {"n": 3})
    assert read_jsonl(ledger) == [{"n": 1}, {"n": 3}]


def test_read_jsonl_of_a_missing_file_is_empty_and_sort_keys_orders_the_line(tmp_path):
    assert read_jsonl(tmp_path / "none.jsonl") == []
    append_jsonl(tmp_path / "m.jsonl", {"b": 1, "a": 2}, sort_keys=True)
    assert (tmp_path / "m.jsonl").read_text() == '{"a": 2, "b": 1}\n'


def test_atomic_dir_replaces_the_folder_or_leaves_it_as_it_was(tmp_path):
    target = tmp_path / "pool"
    with atomic_dir(target) as tmp:
        (tmp / "DONE").write_text("1")
    assert (target / "DONE").read_text() == "1" and _mode(target) == 0o755
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "DONE").write_text("2")
        raise RuntimeError("crash")
    assert (target / "DONE").read_text() == "1"
    assert os.listdir(tmp_path) == ["pool"]
    with atomic_dir(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.npy").write_bytes(b"x")
    assert sorted(p.name for p in target.rglob("*")) == ["sub", "x.npy"]
