"""Issue 10 items 6 and 7b through PyMongo: views (create, list, read through, writes refused
with 166, collMod, drop, change events) and the minimal `$out` / `$merge`."""

import pytest
from pymongo.errors import OperationFailure, WriteError

PIPELINE = [{"$match": {"a": {"$gte": 2}}}, {"$project": {"a": 1}}]


@pytest.fixture
def viewdb(db):
    db.base.insert_many([{"_id": i, "a": i, "hidden": True} for i in range(1, 5)])
    db.create_collection("v", viewOn="base", pipeline=PIPELINE)
    return db


def test_list_collections_describes_the_view(viewdb):
    (entry,) = list(viewdb.list_collections(filter={"name": "v"}))
    assert entry == {
        "name": "v",
        "type": "view",
        "options": {"viewOn": "base", "pipeline": PIPELINE},
        "info": {"readOnly": True},
    }
    assert "v" in viewdb.list_collection_names()
    assert "v" not in viewdb.command("dbHash")["collections"]


def test_reads_go_through_the_view_pipeline(viewdb):
    v = viewdb.v
    assert list(v.find({}, {"_id": 0}).sort("a", -1).skip(1).limit(2)) == [{"a": 3}, {"a": 2}]
    assert v.find_one({"_id": 1}) is None
    assert v.find_one({"_id": 2}) == {"_id": 2, "a": 2}
    assert v.count_documents({"a": {"$lt": 4}}) == 2
    assert v.estimated_document_count() == 3
    assert v.distinct("a") == [2, 3, 4]
    assert list(v.aggregate([{"$group": {"_id": None, "n": {"$sum": 1}}}])) == [{"_id": None, "n": 3}]


def test_writes_to_a_view_fail_with_166(viewdb):
    v = viewdb.v
    with pytest.raises(WriteError) as e:
        v.insert_one({"_id": 10})
    assert e.value.code == 166
    assert e.value.details["errmsg"] == f"Namespace {viewdb.name}.v is a view, not a collection"
    with pytest.raises(WriteError) as e:
        v.update_one({}, {"$set": {"a": 0}})
    assert e.value.code == 166
    with pytest.raises(WriteError) as e:
        v.delete_many({})
    assert e.value.code == 166
    with pytest.raises(OperationFailure) as e:
        v.find_one_and_delete({})
    assert e.value.code == 166
    with pytest.raises(OperationFailure) as e:
        v.create_index("a")
    assert e.value.code == 166
    with pytest.raises(OperationFailure) as e:
        v.watch()
    assert e.value.code == 166
    assert viewdb.base.count_documents({}) == 4


def test_coll_mod_drop_and_change_events(viewdb):
    with viewdb.watch(show_expanded_events=True) as s:
        viewdb.command({"collMod": "v", "pipeline": [{"$match": {"a": 1}}]})
        assert list(viewdb.v.find()) == [{"_id": 1, "a": 1, "hidden": True}]
        viewdb.v.drop()
        viewdb.create_collection("v2", viewOn="base")
        modify = s.next()
        assert modify["operationType"] == "modify"
        assert modify["operationDescription"] == {"viewOn": "base", "pipeline": [{"$match": {"a": 1}}]}
        drop = s.next()
        assert drop["operationType"] == "drop"
        assert drop["ns"] == {"db": viewdb.name, "coll": "v"}
        assert "collectionUUID" not in drop
        create = s.next()
        assert create["operationType"] == "create"
        assert create["operationDescription"] == {"viewOn": "base", "pipeline": []}
    assert "v" not in viewdb.list_collection_names()
    with pytest.raises(OperationFailure) as e:
        viewdb.command({"collMod": "v2", "validator": {"a": 1}})
    assert e.value.code == 72


def test_out_replaces_the_target(db):
    db.src.insert_many([{"_id": i, "v": i} for i in range(5)])
    db.t.insert_one({"_id": "old"})
    assert list(db.src.aggregate([{"$match": {"v": {"$gte": 3}}}, {"$out": "t"}])) == []
    assert list(db.t.find().sort("_id", 1)) == [{"_id": 3, "v": 3}, {"_id": 4, "v": 4}]
    db.src.aggregate([{"$out": {"db": db.name, "coll": "t2"}}])
    assert db.t2.count_documents({}) == 5
    with pytest.raises(OperationFailure) as e:
        db.src.aggregate([{"$out": "x"}, {"$match": {}}])
    assert e.value.code == 40601


@pytest.mark.parametrize(
    "matched,not_matched,expected",
    [
        ("merge", "insert", [{"_id": 1, "v": 1, "keep": 1}, {"_id": 2, "v": 2}]),
        ("replace", "insert", [{"_id": 1, "v": 1}, {"_id": 2, "v": 2}]),
        ("keepExisting", "insert", [{"_id": 1, "v": 0, "keep": 1}, {"_id": 2, "v": 2}]),
        ("merge", "discard", [{"_id": 1, "v": 1, "keep": 1}]),
    ],
)
def test_merge_modes(db, matched, not_matched, expected):
    db.src.insert_many([{"_id": 1, "v": 1}, {"_id": 2, "v": 2}])
    db.t.insert_one({"_id": 1, "v": 0, "keep": 1})
    db.src.aggregate([{"$merge": {"into": "t", "on": "_id", "whenMatched": matched, "whenNotMatched": not_matched}}])
    assert list(db.t.find().sort("_id", 1)) == expected


def test_merge_failures_and_unsupported_options(db):
    db.src.insert_many([{"_id": 1, "v": 1}, {"_id": 2, "v": 2}])
    db.t.insert_one({"_id": 1})
    for spec, code in [
        ({"into": "t", "whenMatched": "fail"}, 11000),
        ({"into": "t", "whenNotMatched": "fail"}, 13113),
        ({"into": "t", "on": "v"}, 115),
        ({"into": "t", "whenMatched": [{"$set": {"x": 1}}]}, 115),
        ({"into": "t", "let": {"x": 1}}, 115),
    ]:
        with pytest.raises(OperationFailure) as e:
            db.src.aggregate([{"$merge": spec}])
        assert e.value.code == code, spec
