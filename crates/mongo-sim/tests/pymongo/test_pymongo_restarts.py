"""Restarts and step-downs as PyMongo sees them: a `mongo-sim --data-dir` killed with SIGKILL
comes back as the same replica set (data, oplog, resume tokens, replicaSetId); a forced
step-down makes the node secondary (writes: NotWritablePrimary), then primary with a higher
term, and a change stream continues across it."""

import re
import signal
import subprocess
import threading
import time

import pymongo
import pytest
from pymongo.errors import NotPrimaryError, OperationFailure

from conftest import _binary, _first_line


def _start(*args):
    proc = subprocess.Popen(
        [str(_binary()), "--replset", "rs0", "--noop-interval-seconds", "1", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = _first_line(proc, timeout=30)
    match = re.fullmatch(r"listening on (\S+):(\d+)\s*", line)
    assert match, f"unexpected first line from mongo-sim: {line!r}"
    return proc, int(match.group(2))


def _client(port, **kw):
    return pymongo.MongoClient(
        f"mongodb://127.0.0.1:{port}/?replicaSet=rs0",
        serverSelectionTimeoutMS=20000,
        heartbeatFrequencyMS=500,
        **kw,
    )


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def _replica_set_id(client):
    return client.admin.command("replSetGetConfig")["config"]["settings"]["replicaSetId"]


def test_sigkill_and_restart_with_data_dir_keeps_data_oplog_tokens_and_identity(tmp_path):
    proc, port = _start("--port", "0", "--data-dir", str(tmp_path))
    try:
        c = _client(port)
        coll = c.persist.items
        coll.create_index("u", unique=True)
        rs_id = _replica_set_id(c)
        coll.insert_one({"_id": "first", "u": -1})
        with coll.watch() as stream:
            token = stream.resume_token
        acked = []
        stop = threading.Event()

        def writer():
            i = 0
            while not stop.is_set():
                try:
                    coll.insert_one({"_id": i, "u": i})
                except pymongo.errors.PyMongoError:
                    return
                acked.append(i)
                i += 1

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while len(acked) < 200:
            assert time.monotonic() < deadline, "writes are too slow"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        last = acked[-1]
        stop.set()
        c.close()
        t.join(timeout=30)
    finally:
        _stop(proc)

    proc, port2 = _start("--port", str(port), "--data-dir", str(tmp_path))
    try:
        assert port2 == port
        c = _client(port)
        coll = c.persist.items
        assert _replica_set_id(c) == rs_id
        ids = {d["_id"] for d in coll.find({}, {"_id": 1})}
        assert set(range(last + 1)) <= ids, "every acknowledged insert survived"
        assert "first" in ids
        with pytest.raises(pymongo.errors.DuplicateKeyError):
            coll.insert_one({"_id": "dup", "u": 0})
        with coll.watch(resume_after=token) as stream:
            for i in range(last + 1):
                change = stream.next()
                assert change["documentKey"] == {"_id": i}
        c.close()
    finally:
        _stop(proc)


def test_forced_step_down_then_primary_with_a_higher_term():
    proc, port = _start("--port", "0")
    try:
        c = _client(port)
        direct = pymongo.MongoClient(
            f"mongodb://127.0.0.1:{port}/?directConnection=true",
            retryWrites=False,
            serverSelectionTimeoutMS=20000,
        )
        coll = c.sd.items
        coll.insert_one({"_id": 0})
        before = direct.admin.command("hello")
        with pytest.raises(OperationFailure) as e:
            c.admin.command("replSetStepDown", 20, secondaryCatchUpPeriodSecs=0)
        assert e.value.code == 262
        with coll.watch() as stream:
            c.admin.command("replSetStepDown", 2, secondaryCatchUpPeriodSecs=0, force=True)
            during = direct.admin.command("hello")
            assert during["isWritablePrimary"] is False
            assert during["secondary"] is True
            assert during["topologyVersion"]["counter"] > before["topologyVersion"]["counter"]
            with pytest.raises(NotPrimaryError) as e:
                direct.sd.items.insert_one({"_id": "refused"})
            assert e.value.details["code"] == 10107
            # The replica-set client's retryable write waits for the new primary and lands.
            coll.insert_one({"_id": 1})
            after = direct.admin.command("hello")
            assert after["isWritablePrimary"] is True
            assert after["electionId"] > before["electionId"]
            assert c.admin.command("replSetGetStatus")["term"] == 2
            change = stream.next()
            assert change["documentKey"] == {"_id": 1}
        assert coll.count_documents({}) == 2
        direct.close()
        c.close()
    finally:
        _stop(proc)
