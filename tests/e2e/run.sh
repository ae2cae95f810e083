#!/usr/bin/env bash
# Runs the end-to-end tests inside a fresh network namespace, so the browsers
# and the server can reach nothing outside it.
#
# Besides loopback the namespace has one veth pair whose both ends stay inside
# it: v0 holds 198.18.0.1/24 (a benchmarking range that exists only in here)
# and fd00:18::1/64 (a unique local one, likewise), and carries the default
# routes; v1 has no address, so anything sent "out" is dropped inside the
# namespace. The default route matters because Chromium gathers ICE
# candidates only on the default-route interface for a page without
# camera/microphone permission (the receive-only case); with loopback alone
# such a page would gather nothing. Likewise, without an IPv6 default route
# Chromium uses no IPv6 at all, not even ::1 (the TURN over IPv6 test).
# Usage: tests/e2e/run.sh   (expects target/debug/callisto to be built)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ns="callisto-e2e-$$"
cleanup() { ip netns del "$ns" 2>/dev/null || true; rm -rf "/etc/netns/$ns"; }
trap cleanup EXIT
# `ip netns exec` mounts this over /etc/resolv.conf: DNS lookups stay on loopback.
mkdir -p "/etc/netns/$ns"
echo "nameserver 127.0.0.1" > "/etc/netns/$ns/resolv.conf"
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" link add v0 type veth peer name v1
ip -n "$ns" addr add 198.18.0.1/24 dev v0
ip -n "$ns" link set v0 up
ip -n "$ns" link set v1 up
ip -n "$ns" route add default dev v0
ip -n "$ns" addr add fd00:18::1/64 dev v0 nodad
ip -n "$ns" -6 route add default dev v0
cd "$here"
# --test-timeout: a test file that hangs (a page promise that never
# settles) fails after 5 minutes instead of taking CI's whole time.
export CALLISTO_BIN="${CALLISTO_BIN:-$here/../../target/debug/callisto}"
ip netns exec "$ns" node --test --test-concurrency=1 --test-timeout=300000 --test-reporter=spec ./*.test.js
