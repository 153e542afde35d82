"""Collation (issue 10 item 3) through PyMongo: locale sorts, case-insensitive equality and
unique indexes, numericOrdering, `_id` uniqueness under a strength-2 default collation, and
the errors of invalid collation documents."""

import pytest
from pymongo import ASCENDING
from pymongo.collation import Collation, CollationStrength
from pymongo.errors import DuplicateKeyError, OperationFailure


def _words(cursor, field="w"):
    return [d[field] for d in cursor]


def test_german_and_french_sorts(db):
    db.de.insert_many([{"w": w} for w in ["Zebra", "Äpfel", "Apfel", "Bär", "Baum"]])
    got = _words(db.de.find({}, {"_id": 0}).sort("w", ASCENDING).collation(Collation("de")))
    assert got == ["Apfel", "Äpfel", "Bär", "Baum", "Zebra"]
    # Without a collation: binary order puts "Ä" (U+00C4) after every ASCII letter.
    assert _words(db.de.find().sort("w", ASCENDING))[-1] == "Äpfel"

    db.fr.insert_many([{"w": w} for w in ["côté", "côte", "coté", "cote"]])
    got = _words(db.fr.find().sort("w", ASCENDING).collation(Collation("fr")))
    assert got == ["cote", "coté", "côte", "côté"]
    got = _words(db.fr.find().sort("w", ASCENDING).collation(Collation("fr_CA")))
    assert got == ["cote", "côte", "coté", "côté"]


def test_case_insensitive_equality_and_unique_index(db):
    ci = Collation("en", strength=CollationStrength.SECONDARY)
    db.users.insert_many([{"name": "Bob"}, {"name": "bob"}, {"name": "Alice"}])
    assert db.users.count_documents({"name": "BOB"}) == 0
    assert db.users.count_documents({"name": "BOB"}, collation=ci) == 2
    assert sorted(db.users.distinct("name", collation=ci), key=str.lower) in (
        ["Alice", "Bob"],
        ["Alice", "bob"],
    )

    db.emails.create_index("email", unique=True, collation=ci)
    db.emails.insert_one({"email": "Bob@Example.com"})
    with pytest.raises(DuplicateKeyError):
        db.emails.insert_one({"email": "bob@example.COM"})
    info = db.emails.index_information()["email_1"]
    assert info["collation"]["strength"] == 2
    assert info["collation"]["locale"] == "en"


def test_numeric_ordering(db):
    db.n.insert_many([{"s": s} for s in ["10", "9", "100", "2"]])
    num = Collation("en", numericOrdering=True)
    assert _words(db.n.find().sort("s", ASCENDING).collation(num), "s") == ["2", "9", "10", "100"]
    assert _words(db.n.find().sort("s", ASCENDING), "s") == ["10", "100", "2", "9"]
    assert db.n.count_documents({"s": {"$gt": "9"}}, collation=num) == 2


def test_id_uniqueness_under_a_strength_2_default(db):
    db.create_collection("people", collation=Collation("en", strength=CollationStrength.SECONDARY))
    spec = db.people.options()["collation"]
    assert spec == {
        "locale": "en",
        "caseLevel": False,
        "caseFirst": "off",
        "strength": 2,
        "numericOrdering": False,
        "alternate": "non-ignorable",
        "maxVariable": "punct",
        "normalization": False,
        "backwards": False,
        "version": "57.1",
    }
    db.people.insert_one({"_id": "Bob"})
    with pytest.raises(DuplicateKeyError):
        db.people.insert_one({"_id": "bob"})
    assert db.people.find_one({"_id": "BOB"})["_id"] == "Bob"
    # An upsert on "bob" finds "Bob" instead of inserting a second document.
    db.people.update_one({"_id": "bob"}, {"$set": {"x": 1}}, upsert=True)
    assert db.people.count_documents({}) == 1
    assert db.people.find_one({})["x"] == 1


@pytest.mark.parametrize(
    "spec,code",
    [
        ({"locale": "en", "nope": 1}, 40415),
        ({"locale": "xx"}, 2),
        ({"locale": "en", "strength": 9}, 51024),
        ({"locale": "en", "caseFirst": "sideways"}, 2),
        ({"strength": 1}, 40414),
    ],
)
def test_invalid_collations(db, spec, code):
    with pytest.raises(OperationFailure) as e:
        db.command({"find": "c", "filter": {}, "collation": spec})
    assert e.value.code == code
