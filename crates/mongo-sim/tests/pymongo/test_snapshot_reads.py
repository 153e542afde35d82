"""Snapshot reads at a point in time (issue 10 item 8) through PyMongo: snapshot sessions
(`start_session(snapshot=True)` pins the `atClusterTime` of its first read) and explicit
`readConcern: {level: "snapshot", atClusterTime}` commands."""

import time

import pytest
from bson.timestamp import Timestamp
from pymongo.errors import OperationFailure


def _history(db):
    """Five documents; the time after them; then an update, a delete and an insert."""
    for i in range(1, 6):
        db.c.insert_one({"_id": i, "v": i})
    at = db.command("ping")["operationTime"]
    db.c.update_one({"_id": 1}, {"$set": {"v": 100}})
    db.c.delete_one({"_id": 2})
    db.c.insert_one({"_id": 6, "v": 6})
    return at


def test_snapshot_session_pins_the_time_of_its_first_read(client, db):
    for i in range(1, 6):
        db.c.insert_one({"_id": i, "v": i})
    with client.start_session(snapshot=True) as s:
        first = list(db.c.find({}, session=s).sort("_id", 1))
        assert [d["_id"] for d in first] == [1, 2, 3, 4, 5]
        # Writes outside the session after its first read.
        db.c.insert_one({"_id": 6, "v": 6})
        db.c.delete_one({"_id": 2})
        db.c.update_one({"_id": 1}, {"$set": {"v": 100}})
        again = list(db.c.find({}, session=s).sort("_id", 1))
        assert again == first
        assert db.c.distinct("v", session=s) == [1, 2, 3, 4, 5]
        total = list(db.c.aggregate([{"$group": {"_id": None, "s": {"$sum": "$v"}}}], session=s))
        assert total[0]["s"] == 15
        # A cursor opened in the snapshot keeps it across getMore.
        cursor = db.c.find({}, session=s, batch_size=2).sort("_id", 1)
        db.c.delete_many({})
        assert [d["_id"] for d in cursor] == [1, 2, 3, 4, 5]
    assert [d["_id"] for d in db.c.find()] == []


def test_explicit_at_cluster_time(db):
    at = _history(db)
    reply = db.command(
        "find", "c", sort={"_id": 1}, batchSize=2, readConcern={"level": "snapshot", "atClusterTime": at}
    )
    assert reply["cursor"]["atClusterTime"] == at
    docs = reply["cursor"]["firstBatch"]
    assert docs == [{"_id": 1, "v": 1}, {"_id": 2, "v": 2}]
    more = db.command("getMore", reply["cursor"]["id"], collection="c")
    assert [d["_id"] for d in more["cursor"]["nextBatch"]] == [3, 4, 5]
    assert more["cursor"]["atClusterTime"] == at
    reply = db.command("distinct", "c", key="v", readConcern={"level": "snapshot", "atClusterTime": at})
    assert reply["values"] == [1, 2, 3, 4, 5]
    assert reply["atClusterTime"] == at


def test_too_old_and_future_times(db):
    db.c.insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as e:
        db.command("find", "c", readConcern={"level": "snapshot", "atClusterTime": Timestamp(1, 1)})
    assert e.value.code == 239
    assert e.value.details["codeName"] == "SnapshotTooOld"
    assert "is older than the oldest available timestamp" in str(e.value)
    now = db.command("ping")["operationTime"]
    future = Timestamp(now.time + 1000, 1)
    with pytest.raises(OperationFailure) as e:
        db.command("find", "c", readConcern={"level": "snapshot", "atClusterTime": future})
    assert e.value.code == 72
    assert "must not be greater than the current clusterTime" in str(e.value)
    with pytest.raises(OperationFailure) as e:
        db.command("find", "c", readConcern={"level": "majority", "atClusterTime": now})
    assert e.value.code == 72


def test_history_window_from_set_parameter(client, db):
    admin = client.admin
    was = admin.command("setParameter", 1, minSnapshotHistoryWindowInSeconds=1)["was"]
    try:
        at = db.command("insert", "c", documents=[{"_id": 1}])["operationTime"]
        time.sleep(2.1)
        db.c.insert_one({"_id": 2})
        with pytest.raises(OperationFailure) as e:
            db.command("find", "c", readConcern={"level": "snapshot", "atClusterTime": at})
        assert e.value.code == 239
    finally:
        admin.command("setParameter", 1, minSnapshotHistoryWindowInSeconds=was)
    assert admin.command("getParameter", 1, minSnapshotHistoryWindowInSeconds=1)[
        "minSnapshotHistoryWindowInSeconds"
    ] == was
