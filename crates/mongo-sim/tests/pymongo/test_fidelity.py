"""Issue 10 through PyMongo: invalidate at batch cuts, strict parsing, command-level `let`,
`arrayFilters`."""

import pytest
from pymongo import ReturnDocument
from pymongo.errors import OperationFailure, WriteError


def _raw_events(db, cmd_db, agg_target, gm_coll, batch, hwm):
    """Opens a stream after `hwm` and reads it to its end; returns (events per reply, ids)."""
    cursor = {} if batch is None else {"batchSize": batch}
    stage = {"startAfter": hwm}
    if cmd_db.name == "admin":
        stage["allChangesForCluster"] = True
    reply = cmd_db.command({"aggregate": agg_target, "pipeline": [{"$changeStream": stage}], "cursor": cursor})
    replies = [([e["operationType"] for e in reply["cursor"]["firstBatch"]], reply["cursor"]["id"])]
    cid = reply["cursor"]["id"]
    for _ in range(50):
        if cid == 0:
            break
        gm = {"getMore": cid, "collection": gm_coll, "maxTimeMS": 200}
        if batch is not None:
            gm["batchSize"] = batch
        r = cmd_db.command(gm)
        cid = r["cursor"]["id"]
        ops = [e["operationType"] for e in r["cursor"]["nextBatch"]]
        if not ops and cid != 0:
            break
        replies.append((ops, cid))
    return replies


@pytest.mark.parametrize("batch", [1, 2, 3, None])
@pytest.mark.parametrize("scope", ["collection", "database"])
def test_invalidate_is_returned_before_the_cursor_closes(client, db, scope, batch):
    coll = db["c"]
    coll.insert_one({"_id": -1})
    agg_target, gm_coll = ("c", "c") if scope == "collection" else (1, "$cmd.aggregate")
    opened = db.command({"aggregate": agg_target, "pipeline": [{"$changeStream": {}}], "cursor": {"batchSize": 0}})
    hwm = opened["cursor"]["postBatchResumeToken"]
    db.command({"killCursors": gm_coll, "cursors": [opened["cursor"]["id"]]})
    # The batch fills exactly at the DDL event: `batch - 1` inserts then the drop.
    inserts = (batch or 101) - 1
    if inserts:
        coll.insert_many([{"_id": i} for i in range(inserts)])
    if scope == "collection":
        coll.drop()
        tail = ["drop", "invalidate"]
    else:
        client.drop_database(db.name)
        tail = ["drop", "dropDatabase", "invalidate"]
    replies = _raw_events(db, db, agg_target, gm_coll, batch, hwm)
    ops = [op for batch_ops, _ in replies for op in batch_ops]
    assert ops == ["insert"] * inserts + tail, replies
    assert replies[-1][1] == 0 and replies[-1][0][-1] == "invalidate", replies
    assert all(cid != 0 for _, cid in replies[:-1]), replies


def test_deployment_stream_is_not_invalidated_by_drop_database(client, db):
    admin = client.admin
    opened = admin.command({"aggregate": 1, "pipeline": [{"$changeStream": {"allChangesForCluster": True}}], "cursor": {"batchSize": 0}})
    hwm = opened["cursor"]["postBatchResumeToken"]
    admin.command({"killCursors": "$cmd.aggregate", "cursors": [opened["cursor"]["id"]]})
    db["c"].insert_one({"_id": 1})
    client.drop_database(db.name)
    replies = _raw_events(db, admin, 1, "$cmd.aggregate", 3, hwm)
    ops = [op for batch_ops, _ in replies for op in batch_ops]
    assert ops[-2:] == ["drop", "dropDatabase"], replies
    assert "invalidate" not in ops
    assert all(cid != 0 for _, cid in replies), replies


def test_unknown_fields_are_rejected(db):
    db["c"].insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as e:
        db.command({"find": "c", "bogus": 1})
    assert e.value.code == 40415
    assert e.value.details["codeName"] == "Location40415"
    assert e.value.details["errmsg"] == "BSON field 'find.bogus' is an unknown field."
    with pytest.raises(OperationFailure) as e:
        db.command({"aggregate": "c", "pipeline": [{"$changeStream": {"bogus": True}}], "cursor": {}})
    assert e.value.code == 40415
    with pytest.raises(OperationFailure) as e:
        db.command({"update": "c", "updates": [{"q": {}, "u": {"$set": {"a": 1}}, "sort": {"_id": 1}}]})
    assert e.value.code == 40415
    assert db["c"].find_one({"_id": 1}) == {"_id": 1}


def test_hint_on_missing_index_and_change_stream_read_concern(db):
    db["c"].insert_one({"_id": 1})
    with pytest.raises(OperationFailure) as e:
        list(db["c"].find({}, hint="nope"))
    assert e.value.code == 2
    assert "hint provided does not correspond to an existing index" in str(e.value)
    assert list(db["c"].find({}, hint=[("_id", 1)])) == [{"_id": 1}]
    with pytest.raises(OperationFailure) as e:
        db.command({"aggregate": "c", "pipeline": [{"$changeStream": {}}], "cursor": {}, "readConcern": {"level": "local"}})
    assert e.value.code == 72
    with db["c"].watch() as stream:
        assert stream.alive


def test_let_and_undefined_variables(db):
    coll = db["c"]
    coll.insert_many([{"_id": 1, "q": 5}, {"_id": 2, "q": 15}])
    assert [d["_id"] for d in coll.find({"$expr": {"$gt": ["$q", "$$m"]}}, let={"m": 10})] == [2]
    assert list(coll.aggregate([{"$project": {"v": "$$m"}}, {"$sort": {"_id": 1}}], let={"m": 1})) == [
        {"_id": 1, "v": 1},
        {"_id": 2, "v": 1},
    ]
    coll.update_many({"$expr": {"$eq": ["$_id", "$$i"]}}, [{"$set": {"q": "$$v"}}], let={"i": 1, "v": 0})
    assert coll.find_one({"_id": 1}) == {"_id": 1, "q": 0}
    doc = coll.find_one_and_update(
        {"$expr": {"$eq": ["$_id", "$$i"]}}, {"$inc": {"q": 1}}, let={"i": 2}, return_document=ReturnDocument.AFTER
    )
    assert doc == {"_id": 2, "q": 16}
    assert coll.delete_many({"$expr": {"$eq": ["$q", "$$z"]}}, let={"z": 0}).deleted_count == 1
    with pytest.raises(OperationFailure) as e:
        list(db["empty"].find({"$expr": {"$eq": ["$a", "$$undefined"]}}))
    assert e.value.code == 17276


def test_array_filters(db):
    coll = db["c"]
    coll.insert_one({"_id": 1, "g": [95, 102, 104], "items": [{"n": "x", "q": 1}, {"n": "y", "q": 2}]})
    r = coll.update_one({"_id": 1}, {"$set": {"g.$[e]": 100}}, array_filters=[{"e": {"$gte": 100}}])
    assert r.modified_count == 1
    coll.update_one({"_id": 1}, {"$inc": {"items.$[].q": 10}})
    doc = coll.find_one_and_update(
        {"_id": 1},
        {"$set": {"items.$[i].n": "z"}},
        array_filters=[{"i.q": {"$gt": 11}}],
        return_document=ReturnDocument.AFTER,
    )
    assert doc == {"_id": 1, "g": [95, 100, 100], "items": [{"n": "x", "q": 11}, {"n": "z", "q": 12}]}
    with pytest.raises(WriteError) as e:
        coll.update_one({"_id": 1}, {"$set": {"g.$[e]": 0}}, array_filters=[{"e": 1}, {"f": 2}])
    assert e.value.code == 9


def test_oplog_collstats_reports_capped_size_and_max_size(client, db):
    """What `rs.printReplicationInfo()` and mongo-syncd's oplog-window estimate read: the oplog is
    capped, and `size` / `maxSize` say how full it is."""
    db["c"].insert_many([{"_id": i} for i in range(10)])
    stats = client["local"].command("collStats", "oplog.rs")
    assert stats["capped"] is True
    assert stats["count"] >= 10
    assert 0 < stats["size"] <= stats["maxSize"]
    first = client["local"]["oplog.rs"].find_one(sort=[("$natural", 1)])
    last = client["local"]["oplog.rs"].find_one(sort=[("$natural", -1)])
    assert first["ts"] <= last["ts"]
