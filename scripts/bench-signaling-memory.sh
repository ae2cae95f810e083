#!/usr/bin/env bash
# Memory per connected signaling client: Callisto and the PeerJS server
# (npm `peer`, installed into a scratch directory), side by side on
# 127.0.0.1, in turns, ROUNDS times each.
#
#   scripts/bench-signaling-memory.sh [CLIENTS] [ROUNDS]   (2000, 2)
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-2000}
rounds=${2:-2}
peerjs_dir=${PEERJS_DIR:-/tmp/callisto-bench-peerjs}

cargo build --release -q
if [ ! -x "$peerjs_dir/node_modules/.bin/peerjs" ]; then
  npm install --prefix "$peerjs_dir" --no-audit --no-fund --loglevel=error peer >/dev/null
fi
echo "PeerJS server $(node -p "require('$peerjs_dir/node_modules/peer/package.json').version"), node $(node --version), $clients clients"

server=
stop() { [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; server=; }
trap stop EXIT
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; exit 1; }

for round in $(seq "$rounds"); do
  ./target/release/callisto serve --listen 127.0.0.1:18700 --turn-listen 127.0.0.1:13700 \
    --max-connections $((clients + 100)) --max-connections-per-ip $((clients + 100)) \
    --log warn >/dev/null 2>&1 &
  server=$!
  wait_port 18700
  python3 scripts/signaling-clients.py callisto "$clients" 18700 "$server"
  stop
  node "$peerjs_dir/node_modules/.bin/peerjs" --port 18701 >/dev/null 2>&1 &
  server=$!
  wait_port 18701
  python3 scripts/signaling-clients.py peerjs "$clients" 18701 "$server"
  stop
done
