#!/usr/bin/env bash
# Checks systemd/mongo-syncd.service:
#   - systemd-analyze verify prints nothing at all (systemd only *warns* about unknown keys or
#     unparsable values and still exits 0, so any output fails here);
#   - systemd-analyze security --offline=true scores <= 2.0 (--threshold is on a 0-100 scale);
#   - the invariants the daemon relies on: Type=notify, WatchdogSec set, TimeoutStopSec longer
#     than shutdown.timeout_seconds (30 s), RestartPreventExitStatus=77 78.
# verify needs ExecStart/ExecStartPre to exist, so a temporary copy of the unit points them at
# BINARY (the built daemon).
# Usage: .ci/checks/systemd.sh target/debug/mongo-syncd
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
binary=${1:?usage: systemd.sh BINARY (the built mongo-syncd)}
[[ -x $binary ]] || { echo "FAIL: $binary is not an executable file" >&2; exit 1; }
binary=$(realpath "$binary")
unit_src=$root/systemd/mongo-syncd.service
shutdown_timeout_seconds=30

command -v systemd-analyze >/dev/null || { echo "FAIL: systemd-analyze not found" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unit=$tmp/mongo-syncd.service
sed -e "s#^\(ExecStart\(Pre\)\?=\)/usr/bin/mongo-syncd #\1$binary #" "$unit_src" >"$unit"
if ! grep -q "^ExecStart=$binary " "$unit" || ! grep -q "^ExecStartPre=$binary " "$unit"; then
    echo "FAIL: could not point ExecStart/ExecStartPre of the unit at $binary" >&2
    exit 1
fi

echo "== $(systemd-analyze --version | head -n 1)"
echo "== systemd-analyze verify --man=no (ExecStart -> $binary)"
out=$(systemd-analyze verify --man=no "$unit" 2>&1) || { echo "$out" >&2; echo "FAIL: verify" >&2; exit 1; }
if [[ -n "$out" ]]; then
    echo "$out" >&2
    echo "FAIL: systemd-analyze verify printed the messages above" >&2
    exit 1
fi
echo "   clean"

echo "== systemd-analyze security --offline=true --threshold=20 (exposure <= 2.0)"
rc=0
out=$(systemd-analyze security --offline=true --man=no --threshold=20 "$unit" 2>&1) || rc=$?
grep -v '^✓' <<<"$out" || true
if [[ $rc -ne 0 ]]; then
    echo "FAIL: exposure above 2.0 (systemd-analyze exited $rc)" >&2
    exit 1
fi

echo "== unit invariants"
fail=0
value() { sed -n "s/^$1=//p" "$unit_src" | tail -n 1; }
expect() {
    if [[ "$2" == "$3" ]]; then echo "   ok   $1=$2"; else echo "   FAIL $1=$2 (want $3)" >&2; fail=1; fi
}
expect Type "$(value Type)" notify
expect NotifyAccess "$(value NotifyAccess)" main
expect KillSignal "$(value KillSignal)" SIGTERM
expect RestartPreventExitStatus "$(value RestartPreventExitStatus)" "77 78"
expect Restart "$(value Restart)" on-failure
if [[ -n "$(value WatchdogSec)" ]]; then
    echo "   ok   WatchdogSec=$(value WatchdogSec)"
else
    echo "   FAIL WatchdogSec unset" >&2
    fail=1
fi
stop=$(value TimeoutStopSec)
stop_seconds=${stop%s}
if [[ $stop_seconds =~ ^[0-9]+$ && $stop_seconds -gt $shutdown_timeout_seconds ]]; then
    echo "   ok   TimeoutStopSec=$stop > shutdown.timeout_seconds=$shutdown_timeout_seconds"
else
    echo "   FAIL TimeoutStopSec=$stop must be plain seconds > $shutdown_timeout_seconds" >&2
    fail=1
fi
for cred in source-uri destination-uri http-token; do
    if grep -q "^LoadCredential=$cred:" "$unit_src"; then echo "   ok   LoadCredential=$cred"
    else echo "   FAIL LoadCredential=$cred missing" >&2; fail=1; fi
done
[[ $fail -eq 0 ]] || exit 1
echo "OK: systemd unit"
