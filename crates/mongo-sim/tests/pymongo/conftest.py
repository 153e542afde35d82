"""Starts the real `mongo-sim` binary for the PyMongo compatibility suite.

The binary is taken from $MONGO_SIM_BIN, else `<target>/debug/mongo-sim` (target = $CARGO_TARGET_DIR
or `target/` at the repository root), building it with cargo when it is missing.
"""

import os
import pathlib
import queue
import re
import subprocess
import threading

import pymongo
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[4]


def _binary() -> pathlib.Path:
    env = os.environ.get("MONGO_SIM_BIN")
    if env:
        return pathlib.Path(env)
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
    binary = target / "debug" / "mongo-sim"
    if not binary.exists():
        subprocess.run(
            ["cargo", "build", "-p", "mongo-sim", "--bin", "mongo-sim"],
            cwd=REPO_ROOT,
            check=True,
        )
    return binary


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        raise RuntimeError("mongo-sim did not print its address in time")


@pytest.fixture(scope="session")
def sim_address():
    proc = subprocess.Popen(
        [str(_binary()), "--port", "0", "--replset", "rs0", "--noop-interval-seconds", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = _first_line(proc, timeout=30)
        match = re.fullmatch(r"listening on (\S+):(\d+)\s*", line)
        assert match, f"unexpected first line from mongo-sim: {line!r}"
        yield match.group(1), int(match.group(2))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def uri(sim_address):
    host, port = sim_address
    return f"mongodb://{host}:{port}/?replicaSet=rs0"


@pytest.fixture
def client(uri):
    c = pymongo.MongoClient(uri, serverSelectionTimeoutMS=10000, heartbeatFrequencyMS=500)
    yield c
    c.close()


@pytest.fixture
def db(client, request):
    """A database of its own for every test."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:60]
    client.drop_database(name)
    return client[name]
