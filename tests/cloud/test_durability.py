"""cloud/state.py's write-ahead log: every accepted update survives a crash, whatever the checkpoint cadence."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from fedge.cloud.state import WAL_NAME, AggregatorState, read_wal
from fedge.cloud.validation import RawUpdate
from fedge.common import codec, wire

ROOT = Path(__file__).resolve().parents[2]
INIT = {"a": np.zeros((3, 4), np.float32), "b": np.zeros(5, np.float32)}
DENSE = codec.CodecParams(topk_ratio=1.0, bits=32, error_feedback=False)


def _raw(i, base=0):
    rng = np.random.default_rng(i)
    delta = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in INIT.items()}
    return RawUpdate(payload=codec.encode(delta, DENSE)[0], base_version=base, metrics={wire.NUM_EXAMPLES: 10.0})


def _feed(st, n, start=0):
    for i in range(start, start + n):
        assert st.submit(_raw(i, st.version), float(i))["accepted"]


def test_updates_accepted_since_the_checkpoint_are_replayed_on_restore(tmp_path):
    kw = {"buffer_size": 3, "checkpoint_every": 5}
    st = AggregatorState(INIT, checkpoint_dir=str(tmp_path), **kw)
    _feed(st, 7)  # versions 1, 2 (no checkpoint since the initial one) + 1 buffered
    back = AggregatorState.restore(str(tmp_path), **kw)  # no shutdown checkpoint: as after kill -9
    assert (back.version, back.accepted, len(back.buffer), back.replayed) == (2, 7, 1, 7)
    assert read_wal(tmp_path / WAL_NAME) == []  # restore checkpointed what it replayed
    for k in INIT:
        np.testing.assert_array_equal(back.params[k], st.params[k])
    st.checkpoint_dir = None  # the one that crashed writes no more
    _feed(st, 2, 7)
    _feed(back, 2, 7)
    for k in INIT:
        np.testing.assert_array_equal(back.params[k], st.params[k])


def test_a_torn_last_record_is_ignored_and_records_already_checkpointed_are_skipped(tmp_path):
    st = AggregatorState(INIT, buffer_size=2, checkpoint_every=100, checkpoint_dir=str(tmp_path))
    _feed(st, 3)
    wal = (tmp_path / WAL_NAME).read_bytes()
    assert len(read_wal(tmp_path / WAL_NAME)) == 3
    (tmp_path / WAL_NAME).write_bytes(wal + wal[:40])  # an append the crash cut short
    st.checkpoint()  # then a checkpoint whose truncation "did not happen": the old records come back
    (tmp_path / WAL_NAME).write_bytes(wal + wal[:40])
    back = AggregatorState.restore(str(tmp_path), checkpoint_every=100)
    assert (back.accepted, back.version, len(back.buffer), back.replayed) == (3, 1, 1, 0)


def test_kill_9_after_acknowledged_updates_loses_none_of_them(tmp_path):
    child = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_durability import INIT, _raw
        from fedge.cloud.state import AggregatorState
        st = AggregatorState(INIT, buffer_size=4, checkpoint_every=1000, checkpoint_dir={str(tmp_path)!r})
        for i in range(10_000):
            st.submit(_raw(i, st.version), float(i))
            print(st.accepted, flush=True)  # acknowledged: logged and fsync'd
    """)
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    acked = 0
    while acked < 25:
        acked = int(p.stdout.readline())
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    back = AggregatorState.restore(str(tmp_path), checkpoint_every=1000)
    assert back.accepted >= acked and back.accepted == back.version * 4 + len(back.buffer)


def test_an_update_that_cannot_be_logged_is_refused_not_acknowledged(tmp_path):
    st = AggregatorState(INIT, buffer_size=2, checkpoint_dir=str(tmp_path))
    _feed(st, 1)
    (tmp_path / WAL_NAME).unlink()
    (tmp_path / WAL_NAME).mkdir()  # the log cannot be appended to (as on a full or failed disk)
    r = st.submit(_raw(5, st.version))
    assert not r["accepted"] and r["reason"] == "invalid" and "write-ahead log" in r["detail"]
    assert st.accepted == 1 and len(st.buffer) == 1
