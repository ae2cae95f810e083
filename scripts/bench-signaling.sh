#!/usr/bin/env bash
# Signaling, Callisto and the PeerJS server (npm `peer`, installed into a
# scratch directory) side by side on 127.0.0.1, in turns, ROUNDS times each:
#
#   scripts/bench-signaling.sh memory [CLIENTS] [ROUNDS]            (2000 2)
#       memory per connected client (scripts/signaling-clients.py)
#   scripts/bench-signaling.sh rate [PAIRS] [RATE] [SECONDS] [ROUNDS] (100 20000 5 3)
#       server CPU per relayed message, loss and latency, under RATE
#       messages a second between PAIRS pairs of clients for SECONDS
#       (scripts/signaling-load.mjs)
#
# Callisto's per-connection rate limit (50 messages/s) is lifted to the load's.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-}
case "$what" in
  memory) clients=${2:-2000}; rounds=${3:-2} ;;
  rate) pairs=${2:-100}; rate=${3:-20000}; seconds=${4:-5}; rounds=${5:-3} ;;
  *) echo "usage: $0 memory [CLIENTS] [ROUNDS] | rate [PAIRS] [RATE] [SECONDS] [ROUNDS]" >&2; exit 2 ;;
esac
peerjs_dir=${PEERJS_DIR:-/tmp/callisto-bench-peerjs}

cargo build --release -q
if [ ! -x "$peerjs_dir/node_modules/.bin/peerjs" ]; then
  npm install --prefix "$peerjs_dir" --no-audit --no-fund --loglevel=error peer >/dev/null
fi
echo "PeerJS server $(node -p "require('$peerjs_dir/node_modules/peer/package.json').version"), node $(node --version)"

server=
stop() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; server=; }
trap stop EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; exit 1; }

measure() { # KIND PORT
  if [ "$what" = memory ]; then
    python3 scripts/signaling-clients.py "$1" "$clients" "$2" "$server"
    return
  fi
  node scripts/signaling-load.mjs "$1" "$2" "$pairs" "$rate" "$seconds" "$server" | node -e '
    const r = JSON.parse(require("fs").readFileSync(0, "utf8"));
    console.log(`${r.kind.padEnd(9)} sent ${r.sent}  received ${r.received}  lost ${r.lost}  ` +
      `p50 ${r.p50_ms} ms  p99 ${r.p99_ms} ms  server CPU ${r.server_cpu_us_per_message} µs per message`);
  '
}

# Connections from 127.0.0.1 the load opens, with room to spare.
most=$(( ${clients:-$(( 2 * ${pairs:-0} ))} + 100 ))
for _ in $(seq "$rounds"); do
  ./target/release/callisto serve --listen 127.0.0.1:18700 --turn-listen 127.0.0.1:13700 \
    --max-connections $((most > 10000 ? most : 10000)) --max-connections-per-ip "$most" \
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
