#!/usr/bin/env python3
"""Fake systemd notify socket for mongo-syncd (python3 stdlib only).

Runs CMD with NOTIFY_SOCKET pointing at an AF_UNIX datagram socket, and WATCHDOG_USEC set,
as systemd does for a Type=notify unit with WatchdogSec=. Every datagram goes to FILE with
its arrival time, one datagram per line:

    <unix time, 6 decimals>\t<field>\t<field>...      e.g.  1732761600.123456\tREADY=1\tSTATUS=syncing

(sd_notify puts several newline-separated assignments in one datagram; they become
tab-separated fields.) Datagrams are echoed to stderr as they arrive.

    sd-notify-harness.py --out notify.log [--signal-after-ready SIGHUP,SIGTERM]
                         [--expect READY=1 --expect STOPPING=1] [--timeout 120] -- CMD ARGS...

--signal-after-ready sends the listed signals in order once READY=1 has been seen. Before
each further signal it waits for the daemon's reaction: the next datagram carrying STATUS=,
RELOADING=1 or READY=1. When that datagram is RELOADING=1 without READY=1, it waits for the
READY=1 that ends the reload. SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 received by the
harness are forwarded to the child.

Exit status: the child's (128+N if killed by signal N), or 124 on --timeout (the child is
killed), or 1 when an --expect'ed field never arrived and the child exited 0.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
REACTION_FIELDS = ("STATUS=", "RELOADING=1", "READY=1")


def parse_signals(spec: str) -> list[signal.Signals]:
    out = []
    for name in filter(None, (s.strip().upper() for s in spec.split(","))):
        if not name.startswith("SIG"):
            name = "SIG" + name
        try:
            out.append(signal.Signals[name])
        except KeyError:
            raise argparse.ArgumentTypeError(f"unknown signal {name}") from None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Use -- before the command.",
    )
    parser.add_argument("--out", required=True, help="file receiving one line per datagram")
    parser.add_argument(
        "--signal-after-ready",
        type=parse_signals,
        default=[],
        metavar="SIG[,SIG...]",
        help="signals to send, in order, after READY=1 (e.g. SIGHUP,SIGTERM)",
    )
    parser.add_argument(
        "--watchdog-usec", type=int, default=2_000_000, help="WATCHDOG_USEC (default 2000000)"
    )
    parser.add_argument(
        "--expect",
        action="append",
        default=[],
        metavar="FIELD",
        help="a field that must arrive (READY=1, WATCHDOG=1, STOPPING=1; STATUS= matches any "
        "status); repeatable",
    )
    parser.add_argument(
        "--timeout", type=float, default=0, help="kill the child after this many seconds (0 = never)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("missing command (after --)")

    tmpdir = tempfile.mkdtemp(prefix="sd-notify-")
    path = os.path.join(tmpdir, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)

    env = dict(os.environ)
    env["NOTIFY_SOCKET"] = path
    env["WATCHDOG_USEC"] = str(args.watchdog_usec)
    env.pop("WATCHDOG_PID", None)  # unset: the watchdog applies to whoever reads it

    out = open(args.out, "w", encoding="utf-8", buffering=1)
    print(f"sd-notify-harness: NOTIFY_SOCKET={path} WATCHDOG_USEC={args.watchdog_usec} "
          f"running {' '.join(command)}", file=sys.stderr)
    child = subprocess.Popen(command, env=env)

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(signum)

    for s in FORWARDED:
        signal.signal(s, forward)

    pending = list(args.signal_after_ready)
    seen: set[str] = set()
    ready = False
    awaiting_reaction = False  # a signal was sent; waiting for the daemon's answer
    awaiting_ready = False  # RELOADING=1 arrived; waiting for the READY=1 ending it
    watchdog_times: list[float] = []
    deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
    timed_out = False

    def send_next():
        nonlocal awaiting_reaction
        sig = pending.pop(0)
        print(f"sd-notify-harness: sending {sig.name} to {child.pid}", file=sys.stderr)
        child.send_signal(sig)
        awaiting_reaction = True

    def handle(datagram: bytes) -> None:
        nonlocal ready, awaiting_reaction, awaiting_ready
        now = time.time()
        fields = [f for f in datagram.decode("utf-8", "replace").split("\n") if f]
        out.write(f"{now:.6f}\t" + "\t".join(fields) + "\n")
        print("notify: " + " | ".join(fields), file=sys.stderr)
        seen.update(fields)
        if "WATCHDOG=1" in fields:
            watchdog_times.append(time.monotonic())
        if "READY=1" in fields and not ready:
            ready = True
            if pending:
                send_next()
            return
        if awaiting_ready:
            if "READY=1" in fields:
                awaiting_ready = False
                if pending:
                    send_next()
            return
        if awaiting_reaction and any(f.startswith(REACTION_FIELDS) for f in fields):
            awaiting_reaction = False
            if "RELOADING=1" in fields and "READY=1" not in fields:
                awaiting_ready = True
            elif pending:
                send_next()

    def drain() -> None:
        while True:
            try:
                handle(sock.recv(65536))
            except BlockingIOError:
                return

    while child.poll() is None:
        timeout = 0.2
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                print("sd-notify-harness: timeout, killing the child", file=sys.stderr)
                child.kill()
                break
            timeout = min(timeout, left)
        try:
            readable, _, _ = select.select([sock], [], [], timeout)
        except InterruptedError:
            continue
        if readable:
            drain()
    rc = child.wait()
    drain()
    out.close()
    sock.close()
    os.unlink(path)
    os.rmdir(tmpdir)

    if len(watchdog_times) > 1:
        gaps = [b - a for a, b in zip(watchdog_times, watchdog_times[1:])]
        print(f"sd-notify-harness: {len(watchdog_times)} WATCHDOG=1, largest gap {max(gaps):.2f}s "
              f"(WATCHDOG_USEC={args.watchdog_usec / 1e6:.2f}s)", file=sys.stderr)
    if pending:
        print(f"sd-notify-harness: signals never sent: {[s.name for s in pending]}",
              file=sys.stderr)
    if timed_out:
        return 124
    if rc < 0:
        rc = 128 - rc
    print(f"sd-notify-harness: child exited {rc}", file=sys.stderr)
    missing = [
        f for f in args.expect
        if not any(x == f or (f.endswith("=") and x.startswith(f)) for x in seen)
    ]
    if missing:
        print(f"sd-notify-harness: expected but never received: {missing}", file=sys.stderr)
        if rc == 0:
            return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
