"""A large simulation's shared pool: the partition is deterministic and disjoint per device, a device reads only
its rows and only when asked, the rendered pool is cached by content, and Flower's engine delivers messages in
one scan."""

import gc
import threading
import tracemalloc
from queue import Queue
from types import SimpleNamespace

import numpy as np
import pytest

from fedge.common import pool as pool_files
from fedge.common.config import load_config
from fedge.simulations import pool


def _counts(devices, samples=4, partition="dirichlet", seed=0):
    return pool.device_label_counts(devices, samples_per_device=samples, seed=seed, partition=partition,
                                    dirichlet_alpha=0.3, num_classes=10)


def test_pool_partition_is_deterministic_and_disjoint_when_the_pool_suffices():
    labels = np.repeat(np.arange(10), 60)  # 600 rows, 60 per digit
    counts = _counts(100)  # 400 draws, Dirichlet label skew
    a, reuse = pool.pool_partition(labels, counts, seed=3)
    b, _ = pool.pool_partition(labels, counts, seed=3)
    assert reuse == 1 and np.array_equal(a, b)
    dealt = a[a >= 0]
    assert len(dealt) == counts.sum() and len(np.unique(dealt)) == len(dealt)  # no row on two devices
    for d in range(100):  # each device got its label mix
        assert np.array_equal(np.bincount(labels[a[d][a[d] >= 0]], minlength=10), counts[d])
    c, _ = pool.pool_partition(labels, counts, seed=4)
    assert not np.array_equal(a, c)  # the seed decides which rows


def test_pool_partition_reuses_rows_only_when_the_pool_runs_out_and_never_within_a_device():
    labels = np.repeat(np.arange(10), 5)  # 50 rows for 800 draws
    counts = _counts(200)
    table, reuse = pool.pool_partition(labels, counts, seed=0)
    assert reuse > 1
    per_row = np.bincount(table[table >= 0], minlength=50)
    assert per_row.max() <= reuse
    for row in table:
        got = row[row >= 0]
        assert len(np.unique(got)) == len(got)


def test_pool_partition_needs_every_drawn_label_in_the_pool():
    with pytest.raises(ValueError, match="no sample of label"):
        pool.pool_partition(np.zeros(20, dtype=np.int64), _counts(10, partition="iid"), seed=0)


def test_speaker_partition_cannot_draw_from_a_pool():
    with pytest.raises(ValueError, match="carry no speaker"):
        _counts(3, partition="speaker")


def test_device_label_counts_match_the_rendered_runs_draw():
    from fedge.simulations import avdigits

    plans = avdigits.plan_devices(5, samples_per_device=7, seed=2, partition="dirichlet", dirichlet_alpha=0.3)
    counts = pool.device_label_counts(5, samples_per_device=7, seed=2, partition="dirichlet", dirichlet_alpha=0.3,
                                      num_classes=10)
    for p, c in zip(plans, counts):
        assert np.array_equal(np.bincount(p.labels, minlength=10), c)


def _write_pool(root, n=400, devices=50):
    rng = np.random.default_rng(0)
    arrays = {"image": rng.random((n, 3, 32, 32), dtype=np.float32),
              "audio": rng.random((n, 40, 32), dtype=np.float32), "label": np.repeat(np.arange(10), n // 10).astype(np.int64), "mask": np.ones((n, 2), dtype=bool),
              "quality": np.ones((n, 2), dtype=np.float32)}
    pool_files.write_columns(root, arrays)
    table, _ = pool.pool_partition(arrays["label"], _counts(devices), seed=0)
    np.save(root / pool_files.ASSIGNMENT, table)
    return arrays, table


def test_idle_devices_hold_no_data_and_a_training_device_reads_only_its_rows(tmp_path):
    from fedge.edge.data import local_data
    from fedge.edge.node_config import NodeConfig

    arrays, table = _write_pool(tmp_path)
    cfg = load_config(toml_path=None, overrides={"data.source": "pool", "data.store_root": str(tmp_path),
                                                 "data.missing_image": 0.1})
    nodes = [NodeConfig(partition_id=i, num_partitions=50) for i in range(50)]  # what an idle device is
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    got = local_data(cfg, nodes[7], "train")
    rows = np.sort(table[7][table[7] >= 0])
    assert np.array_equal(got["label"], arrays["label"][rows])
    assert np.allclose(got["image"], arrays["image"][rows])
    held = tracemalloc.get_traced_memory()[0] - before
    assert held < 4 * sum(v[rows].nbytes for v in arrays.values()) + 200_000  # its rows, not the pool (>20 MB)
    del got
    gc.collect()
    left = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert left < 100_000  # nothing of the device's data stays once it has trained
    assert local_data(cfg, nodes[7], "eval")["label"].shape == (0,)
    # a device without a camera keeps only its audio (data.missing_image takes 5 of 50 devices' cameras)
    no_cam = [n for n in nodes if local_data(cfg, n)["mask"][:, 0].sum() == 0]
    assert len(no_cam) == 5 and all(local_data(cfg, n)["mask"][:, 1].all() for n in no_cam)


def test_a_device_outside_the_assignment_is_a_clear_error(tmp_path):
    _write_pool(tmp_path, devices=5)
    with pytest.raises(ValueError, match="not in the pool's assignment"):
        pool_files.device_arrays(tmp_path, 5)


@pytest.mark.integration
def test_pool_is_rendered_once_and_reused_by_another_device_count(tmp_path, monkeypatch):
    from fedge.simulations import prepare

    calls = []
    real = prepare._render_and_ingest

    def counting(job):
        calls.append(job[0].pid)
        return real(job)

    monkeypatch.setattr(prepare, "_render_and_ingest", counting)
    sets = {"simulation.pool_samples": 20, "simulation.pretrain_steps": 0, "simulation.frame_size": 32,
            "simulation.fps": 4.0, "data.samples_per_device": 2, "data.eval_samples": 10,
            "data.partition": "dirichlet"}
    cfg = load_config(toml_path=None, overrides={**sets, "simulation.devices": 12})
    out = prepare.prepare(cfg, tmp_path, workers=1, progress=False)
    pool_calls = [p for p in calls if p <= -100]
    assert len(pool_calls) == 10  # one stream of 2 shots per digit
    assert out.data.source == "pool"
    table = np.load(f"{out.data.store_root}/{pool_files.ASSIGNMENT}")
    assert table.shape == (12, 2)
    calls.clear()
    cfg2 = load_config(toml_path=None, overrides={**sets, "simulation.devices": 30})
    out2 = prepare.prepare(cfg2, tmp_path, workers=1, progress=False)
    assert [p for p in calls if p <= -100] == []  # the pool came from the cache; only the held-out set rendered
    assert np.load(f"{out2.data.store_root}/{pool_files.ASSIGNMENT}").shape == (30, 2)
    assert len(list(tmp_path.glob("pool-*"))) == 1


def test_engine_pump_delivers_one_message_per_node_per_pass_in_store_order():
    from fedge.simulations.engine import next_messages

    def msg(dst):
        return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=dst, delivered_at=""))

    store = {"a": msg(1), "b": msg(2), "c": msg(1), "d": msg(9)}
    checked = []
    state = SimpleNamespace(lock=threading.RLock(), message_ins_store=store,
                            _check_stored_messages=lambda ids: checked.append(ids))
    first = next_messages(state, {1, 2})
    assert [m is store[k] for k, m in zip("ab", first)] == [True, True] and len(first) == 2
    assert checked == [{"a", "b", "c", "d"}]
    assert [m is store["c"] for m in next_messages(state, {1, 2})] == [True]
    assert next_messages(state, {1, 2}) == []  # node 9 is no node of this engine


def test_engine_install_replaces_only_the_pump():
    from flwr.server.superlink.fleet.vce import vce_api

    from fedge.simulations import engine

    assert engine.install() and vce_api.add_messages_to_queue is engine.add_messages_to_queue
    assert engine.install()  # twice is harmless: Flower's own pump stays remembered
    assert engine._flower_pump is not engine.add_messages_to_queue
    q: Queue = Queue()
    stop = threading.Event()
    stop.set()
    engine.add_messages_to_queue(SimpleNamespace(message_ins_store={}, lock=threading.RLock(),
                                                 _check_stored_messages=lambda ids: None), q, {}, stop)
    assert q.empty()
