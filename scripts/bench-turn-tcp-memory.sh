#!/usr/bin/env bash
# TURN over TCP: the server's resident memory per client connection with
# an allocation, Callisto (`callisto turn`) and coturn side by side on
# 127.0.0.1. coturn's own client (`turnutils_uclient -t`) opens CLIENTS
# connections, allocates, relays 50 packets each to an echo peer and
# leaves, RUNS times in a row against one server: the first run shows a
# fresh process, the later ones what memory freed by earlier connections
# costs when it is handed out again.
#
#   scripts/bench-turn-tcp-memory.sh [CLIENTS] [RUNS]   (200 3)
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-200}
runs=${2:-3}
cargo build --release -q

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; exit 1; }

turnutils_peer -L 127.0.0.1 -p 18720 >/dev/null 2>&1 &
pids+=($!)

measure() { # NAME PORT PID
  local before after run
  before=$(rss_kib "$3")
  for run in $(seq "$runs"); do
    turnutils_uclient -t -u user -w pass -e 127.0.0.1 -r 18720 -n 50 -m "$clients" -l 100 -z 20 -c \
      -p "$2" 127.0.0.1 >/tmp/bench-turn-tcp-uclient.log 2>&1
    after=$(rss_kib "$3")
    awk -v name="$1" -v run="$run" -v b="$before" -v a="$after" -v n="$clients" \
      -v lost="$(grep -o 'Total lost packets [0-9]*' /tmp/bench-turn-tcp-uclient.log || echo 'no totals')" \
      'BEGIN { printf "%-9s run %s  RSS %6.1f -> %6.1f MiB  %5.1f KiB per connection  (%s)\n", name, run, b / 1024, a / 1024, (a - b) / n, lost }'
  done
}

./target/release/callisto turn --turn-listen 127.0.0.1:18721 --turn-user user:pass \
  --turn-user-quota $((clients * 2)) --turn-max-connections-per-ip $((clients * 2)) \
  --turn-allow-peer 127.0.0.1/32 --log warn >/dev/null 2>&1 &
server=$!
pids+=("$server")
wait_port 18721
measure callisto 18721 "$server"
kill "$server"

turnserver -n --listening-ip=127.0.0.1 --relay-ip=127.0.0.1 --listening-port=18722 \
  --lt-cred-mech --user=user:pass --realm=bench --allow-loopback-peers --no-cli --no-tls --no-dtls \
  --log-file=/dev/null --pidfile=/dev/null --min-port=41000 --max-port=49000 >/dev/null 2>&1 &
server=$!
pids+=("$server")
wait_port 18722
measure coturn 18722 "$server"
