"""The simulator's memory and update rate as its oplog grows (not run by CI).

    python oplog_growth.py PATH/TO/mongo-sim [WRITES]

Starts the binary, inserts 100,000 documents of ~250 bytes, then sends unordered `$set`
bulks of 1,000 statements (majority write concern) and prints, every 50,000 updates, the
rate, the simulator's RSS and its CPU time per write. The oplog keeps up to 1,000,000
entries by default, so what each entry retains shows as RSS growth.
"""

import os
import subprocess
import sys
import time

from pymongo import MongoClient

DOCS = 100_000
STEP = 50_000


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    binary = sys.argv[1]
    writes = int(sys.argv[2]) if len(sys.argv) > 2 else 700_000
    sim = subprocess.Popen(
        [binary, "--port", "0", "--replset", "growth", "--noop-interval-seconds", "1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        host = sim.stdout.readline().strip().split("listening on ")[1]
        db = MongoClient(f"mongodb://{host}/?directConnection=true").perf
        for start in range(0, DOCS, 10_000):
            db.command(
                {
                    "insert": "docs",
                    "documents": [
                        {
                            "_id": i,
                            "name": f"customer-{i:08}",
                            "email": f"customer{i}@example.com",
                            "balance": i / 100.0,
                            "active": i % 3 != 0,
                            "tags": ["alpha", "beta", f"t{i % 97}"],
                            "address": {"street": f"{i % 1000} Main St", "city": "Springfield", "zip": f"{i:05}"},
                        }
                        for i in range(start, start + 10_000)
                    ],
                }
            )
        for first in range(0, writes, STEP):
            statements = [
                {"q": {"_id": (k * 7_919) % DOCS}, "u": {"$set": {"visits": k}}}
                for k in range(first, first + STEP)
            ]
            started, cpu0 = time.monotonic(), cpu_seconds(sim.pid)
            for s in range(0, STEP, 1_000):
                db.command(
                    {
                        "update": "docs",
                        "updates": statements[s : s + 1_000],
                        "ordered": False,
                        "writeConcern": {"w": "majority", "j": True},
                    }
                )
            elapsed = time.monotonic() - started
            cpu_us = (cpu_seconds(sim.pid) - cpu0) * 1e6 / STEP
            rss = int(open(f"/proc/{sim.pid}/status").read().split("VmRSS:")[1].split()[0]) // 1024
            print(
                f"after {DOCS + first + STEP:>9,} writes: {STEP / elapsed:>9,.0f} updates/s"
                f"  RSS {rss:>5,} MiB  {cpu_us:5.1f} µs of CPU per write",
                flush=True,
            )
    finally:
        sim.kill()


if __name__ == "__main__":
    main()
