"""The run log contract: version records and events round-trip to the same flat JSON, keep keys they do not name,
skip a torn last line, and read what the server and the Flower peer write."""

import json

import pytest

from fedge.cloud import run_log as server_log
from fedge.common.run_log import (
    EVENT_LOG,
    VERSION_LOG,
    RunEvent,
    RunLogError,
    VersionRecord,
    append_event,
    append_version,
    read_events,
    read_versions,
)

# a line as the server writes it under simulation (key order included)
SERVER_LINE = {"version": 4, "accuracy": 0.75, "loss": 0.61, "acc-image": 0.7, "acc-audio": 0.65,
               "acc-image+audio": 0.8, "updates": 3, "upload_bytes": 4096, "virtual_time": 12.5, "wall_time": 3.25,
               "bytes_sent": 16384, "bytes_down": 65536, "staleness": [0, 1, 2], "rejected": {"stale": 1},
               "inflight": 2, "mode": "async"}
# a line as the plain-Flower peer of the benchmarks writes it
PEER_LINE = {"version": 2, "accuracy": 0.5, "loss": 1.1, "updates": 4, "wall_time": 7.0}


def test_server_line_reads_as_typed_fields_and_writes_back_the_same_json():
    rec = VersionRecord.from_json(SERVER_LINE)
    assert rec.version == 4 and rec.accuracy == 0.75 and rec.virtual_time == 12.5 and rec.real_time is None
    assert rec.modality_accuracy == {"image": 0.7, "audio": 0.65, "image+audio": 0.8}
    assert rec.staleness == [0, 1, 2] and rec.rejected == {"stale": 1} and rec.extra == {}
    assert rec.clock_time == 12.5
    out = rec.to_json()
    assert out == SERVER_LINE and list(out) == list(SERVER_LINE)


def test_absent_fields_stay_absent_in_the_json():
    rec = VersionRecord.from_json(PEER_LINE)
    assert rec.upload_bytes is None and rec.staleness is None and rec.modality_accuracy == {}
    assert rec.to_json() == PEER_LINE


def test_unknown_keys_are_kept_not_dropped():
    line = {**SERVER_LINE, "energy_j": 1.5, "notes": {"a": [1, 2]}}
    rec = VersionRecord.from_json(line)
    assert rec.extra == {"energy_j": 1.5, "notes": {"a": [1, 2]}}
    assert rec.to_json() == line


def test_a_typed_key_of_the_wrong_type_fails_naming_it():
    with pytest.raises(RunLogError, match="'updates'"):
        VersionRecord.from_json({"version": 1, "updates": "three"})
    with pytest.raises(RunLogError, match="'version'"):
        VersionRecord.from_json({"accuracy": 0.5})
    with pytest.raises(RunLogError, match="'accuracy'"):
        VersionRecord(version=1, extra={"accuracy": 0.5})


def test_a_staleness_histogram_of_older_servers_reads_as_the_list():
    assert VersionRecord.from_json({"version": 1, "staleness": {"0": 2, "3": 1}}).staleness == [0, 0, 3]


def test_plottable_scalars_are_the_finite_numbers_but_the_version():
    rec = VersionRecord(version=3, accuracy=0.5, loss=float("nan"), modality_accuracy={"image": 0.4},
                        staleness=[1], rejected={"stale": 1}, mode="sync")
    assert rec.scalars() == {"accuracy": 0.5, "acc-image": 0.4}


def test_versions_append_and_read_back_in_order(tmp_path):
    recs = [VersionRecord.from_json(SERVER_LINE), VersionRecord.from_json(PEER_LINE)]
    for r in recs:
        append_version(tmp_path, r)
    assert read_versions(tmp_path) == recs
    assert read_versions(tmp_path / VERSION_LOG) == recs  # the file itself, too
    assert read_versions(tmp_path / "nowhere") == []


def test_a_torn_last_line_is_skipped_and_the_next_append_stays_whole(tmp_path):
    append_version(tmp_path, VersionRecord(version=1, accuracy=0.1))
    with open(tmp_path / VERSION_LOG, "a") as f:  # a writer killed mid-append
        f.write('{"version": 2, "accur')
    assert [r.version for r in read_versions(tmp_path)] == [1]
    append_version(tmp_path, VersionRecord(version=3, accuracy=0.3))
    assert [r.version for r in read_versions(tmp_path)] == [1, 3]


def test_events_round_trip_with_their_fields(tmp_path):
    append_event(tmp_path, "started", version=0, mode="async")
    append_event(tmp_path, "secagg_group", group="ab12", members=5, senders=4, holders=5, threshold=3, version=1)
    with open(tmp_path / EVENT_LOG, "a") as f:
        f.write('{"event": "stop')
    events = read_events(tmp_path)
    assert events == [RunEvent("started", {"version": 0, "mode": "async"}),
                      RunEvent("secagg_group", {"group": "ab12", "members": 5, "senders": 4, "holders": 5,
                                                "threshold": 3, "version": 1})]
    first = json.loads((tmp_path / EVENT_LOG).read_text().splitlines()[0])
    assert first == {"event": "started", "version": 0, "mode": "async"} and next(iter(first)) == "event"
    with pytest.raises(RunLogError, match="'event'"):
        RunEvent.from_json({"version": 1})


def test_what_the_server_writes_reads_back_through_the_contract(tmp_path):
    rec = VersionRecord.from_json(SERVER_LINE)
    server_log.metrics_record(tmp_path, rec)
    server_log.event(tmp_path, event="resumed", version=4, recovery_s=1.5, ray="embedded")
    server_log.metrics_record(None, rec)  # no run dir: nothing written, nothing raised
    server_log.event(None, event="started")
    assert json.loads((tmp_path / VERSION_LOG).read_text()) == SERVER_LINE  # the JSON format is unchanged
    assert read_versions(tmp_path) == [rec]
    assert read_events(tmp_path) == [RunEvent("resumed", {"version": 4, "recovery_s": 1.5, "ray": "embedded"})]


def test_the_servers_console_line_comes_from_the_record():
    line = server_log.version_line(VersionRecord.from_json(SERVER_LINE), t=12.5, virtual=True)
    assert line.startswith("[fedge] version   4  accuracy 0.750  loss 0.610")
    assert "(virtual)" in line and "updates 3" in line and "staleness 1.0" in line and "rejected 1" in line
    assert "uploaded 4.0 KiB" in line
    bare = server_log.version_line(VersionRecord(version=5, updates=0, upload_bytes=0, staleness=[]), t=1.0,
                                   virtual=False)
    assert "accuracy -  loss -" in bare and "staleness -" in bare


def test_event_names_are_one_vocabulary_and_read_back_as_plain_strings(tmp_path):
    from fedge.common.run_log import Event

    append_event(tmp_path, Event.SECAGG_GROUP, senders=4)
    (got,) = read_events(tmp_path)
    assert got.event == Event.SECAGG_GROUP == "secagg_group" and type(got.event) is str
    assert len({e.value for e in Event}) == len(Event)
