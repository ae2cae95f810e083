#!/usr/bin/env bash
# Signaling relay: server CPU per delivered message, loss and latency, for
# Callisto and the PeerJS server (npm `peer`, installed into a scratch
# directory), side by side on 127.0.0.1, in turns, ROUNDS times each.
# The load (scripts/signaling-load.mjs) offers RATE messages a second
# between PAIRS pairs of clients for SECONDS (plus one unmeasured second).
#
#   scripts/bench-signaling-rate.sh [PAIRS] [RATE] [SECONDS] [ROUNDS]   (100 20000 5 3)
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${1:-100}
rate=${2:-20000}
seconds=${3:-5}
rounds=${4:-3}
peerjs_dir=${PEERJS_DIR:-/tmp/callisto-bench-peerjs}

cargo build --release -q
if [ ! -x "$peerjs_dir/node_modules/.bin/peerjs" ]; then
  npm install --prefix "$peerjs_dir" --no-audit --no-fund --loglevel=error peer >/dev/null
fi
echo "PeerJS server $(node -p "require('$peerjs_dir/node_modules/peer/package.json').version"), node $(node --version)"
echo "$pairs pairs, $rate messages/s offered for $seconds s"

server=
stop() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; server=; }
trap stop EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; exit 1; }
measure() { # KIND PORT
  node scripts/signaling-load.mjs "$1" "$2" "$pairs" "$rate" "$seconds" "$server" | node -e '
    const r = JSON.parse(require("fs").readFileSync(0, "utf8"));
    console.log(`${r.kind.padEnd(9)} sent ${r.sent}  received ${r.received}  lost ${r.lost}  ` +
      `p50 ${r.p50_ms} ms  p99 ${r.p99_ms} ms  server CPU ${r.server_cpu_us_per_message} µs per message`);
  '
}

for round in $(seq "$rounds"); do
  # The per-connection rate limit (50/s by default) is lifted to the load's.
  ./target/release/callisto serve --listen 127.0.0.1:18700 --turn-listen 127.0.0.1:13700 \
    --max-messages-per-second 100000 --max-message-burst 100000 --log warn >/dev/null 2>&1 &
  server=$!
  wait_port 18700
  measure callisto 18700
  stop
  node "$peerjs_dir/node_modules/.bin/peerjs" --port 18701 >/dev/null 2>&1 &
  server=$!
  wait_port 18701
  measure peerjs 18701
  stop
done
