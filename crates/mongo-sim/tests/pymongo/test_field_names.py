"""Issue 10 item 5 through PyMongo: `$`-prefixed and dotted field names as MongoDB 5.0+ treats
them (the manual's "Field Names with Periods and Dollar Signs" pages and the server's
`jstests/core/field_name_validation.js`)."""

import bson
import pytest
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument
from pymongo.errors import OperationFailure, WriteError

RAW = CodecOptions(document_class=RawBSONDocument)

SAMPLE = {
    "_id": 1,
    "$price": 50.0,
    "quantity": 30,
    "a.b": 1,
    "location": {"$db": "novels", "$ref": "2007042768", "$inc": True, "c.d": [{"$x": 1}]},
}


def raw_find_one(coll, flt):
    return coll.with_options(codec_options=RAW).find_one(flt).raw


def test_insert_and_find_round_trip_byte_for_byte(db):
    db.c.insert_one(dict(SAMPLE))
    db.c.insert_one({"_id": 2, "$id": "h1961-01", "$db": 1, "$ref": 2})
    assert raw_find_one(db.c, {"_id": 1}) == bson.encode(SAMPLE)
    agg = list(db.c.with_options(codec_options=RAW).aggregate([{"$match": {"_id": 2}}]))
    assert agg[0].raw == bson.encode({"_id": 2, "$id": "h1961-01", "$db": 1, "$ref": 2})
    with pytest.raises(WriteError) as e:
        db.c.insert_one({"_id": {"a": {"$b": 1}}})
    assert e.value.code == 52


def test_queries_walk_paths_and_get_field_reads_names(db):
    db.c.insert_many([dict(SAMPLE), {"_id": 2, "a": {"b": 1}}])
    assert [d["_id"] for d in db.c.find({"a.b": 1})] == [2]
    assert [d["_id"] for d in db.c.find({"location.$inc": True})] == [1]
    assert [d["_id"] for d in db.c.find({"$expr": {"$eq": [{"$getField": "a.b"}, 1]}})] == [1]
    flt = {"$expr": {"$eq": [{"$getField": {"$literal": "$price"}}, 50]}}
    assert [d["_id"] for d in db.c.find(flt)] == [1]


def test_replacement_with_a_top_level_dollar_field_is_refused(db):
    db.c.insert_one({"_id": 1})
    reply = db.command("update", "c", updates=[{"q": {"_id": 1}, "u": {"$c": 1}}])
    (err,) = reply["writeErrors"]
    assert err["code"] == 9
    assert err["errmsg"].startswith("Unknown modifier: $c.")
    with pytest.raises(WriteError) as e:
        db.c.replace_one({"_id": 1}, {"x": 1, "$c": 1})
    assert e.value.code == 52
    assert e.value.details["errmsg"] == (
        "The dollar ($) prefixed field '$c' in '$c' is not allowed in the context of an "
        "update's replacement document. Consider using an aggregation pipeline with $replaceWith."
    )
    with pytest.raises(OperationFailure) as e:
        db.c.find_one_and_replace({"_id": 1}, {"x": 1, "$invalid": 1})
    assert e.value.code == 52
    db.c.replace_one({"_id": 1}, {"a": {"$c": 1}, "d.e": 2})
    assert raw_find_one(db.c, {"_id": 1}) == bson.encode({"_id": 1, "a": {"$c": 1}, "d.e": 2})


def test_operator_updates(db):
    db.c.insert_one({"_id": 1, "$bin": 200, "quantity": 100, "address": {"$street": "Elm"}})
    db.c.update_one({"_id": 1}, {"$inc": {"quantity": 1}, "$set": {"address.$street": "Oak"}})
    assert raw_find_one(db.c, {"_id": 1}) == bson.encode(
        {"_id": 1, "$bin": 200, "quantity": 101, "address": {"$street": "Oak"}}
    )
    with pytest.raises(WriteError) as e:
        db.c.update_one({"_id": 1}, {"$set": {"$hotel": 1}})
    assert e.value.code == 52
    r = db.c.update_one({"date": "2021-07-07"}, {"$set": {"phone": 25.17, "$hotel": 320.1}}, upsert=True)
    assert r.upserted_id is not None
    assert db.c.find_one({"_id": r.upserted_id})["$hotel"] == 320.1


def test_pipeline_updates_with_set_field_unset_field_and_literal(db):
    db.c.insert_one({"_id": 1})
    db.c.update_one({"_id": 1}, [{"$replaceWith": {"$literal": {"_id": 1, "$in": 2, "x.y": 3}}}])
    assert raw_find_one(db.c, {"_id": 1}) == bson.encode({"_id": 1, "$in": 2, "x.y": 3})
    db.c.update_one(
        {"_id": 1},
        [
            {"$replaceWith": {"$setField": {"field": "x.y", "input": "$$ROOT", "value": 4}}},
            {"$replaceWith": {"$unsetField": {"field": {"$literal": "$in"}, "input": "$$ROOT"}}},
        ],
    )
    assert raw_find_one(db.c, {"_id": 1}) == bson.encode({"_id": 1, "x.y": 4})
    out = list(db.c.aggregate([{"$project": {"_id": 0, "v": {"$getField": "x.y"}}}]))
    assert out == [{"v": 4}]


def test_change_events_and_disambiguated_paths(db):
    db.create_collection("c")
    filler = "f" * 200
    with db.c.watch(show_expanded_events=True) as expanded, db.c.watch() as plain:
        db.c.insert_one({"_id": 1, "filler": filler, "$p": 1, "x.y": 1, "a": {"1": 1}})
        db.c.update_one(
            {"_id": 1}, [{"$replaceWith": {"$setField": {"field": "x.y", "input": "$$ROOT", "value": 2}}}]
        )
        db.c.update_one({"_id": 1}, {"$set": {"a.1": 2}})
        e = expanded.next()
        assert list(e["fullDocument"].keys()) == ["_id", "filler", "$p", "x.y", "a"]
        e = expanded.next()
        assert e["updateDescription"]["updatedFields"] == {"x.y": 2}
        assert e["updateDescription"]["disambiguatedPaths"] == {"x.y": ["x.y"]}
        e = expanded.next()
        assert e["updateDescription"]["disambiguatedPaths"] == {"a.1": ["a", "1"]}
        plain.next()
        for _ in range(2):
            assert "disambiguatedPaths" not in plain.next()["updateDescription"]


def test_db_hash_is_stable(db, client):
    doc = {"_id": 1, "$p": 1, "x.y": {"$q": [1, {"a.b": 2}]}}
    db.c.insert_one(dict(doc))
    first = db.command("dbHash")
    other = client[db.name + "_2"]
    client.drop_database(other.name)
    other.c.insert_one({"_id": 1})
    other.c.update_one({"_id": 1}, [{"$replaceWith": {"$literal": doc}}])
    assert other.command("dbHash")["collections"] == first["collections"]
    assert db.command("dbHash")["md5"] == first["md5"]
    client.drop_database(other.name)
