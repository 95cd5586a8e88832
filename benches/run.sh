#!/usr/bin/env bash
# The benchmark suite: builds release, runs the standard scenarios against a fresh server on
# 127.0.0.1 (server and load generator share this machine), repeats each, and writes
# BENCHMARKS.md with the medians. Usage: benches/run.sh [repetitions, default 3]
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-3}
OUT=target/bench
BIN=target/release/agentwire
KEY=bench-api-key-0123456789
PORT=18080
# The server and the load generator sign and check tokens with the same secret.
export AGENTWIRE__AUTH__SECRET=bench-secret-of-the-benchmarks-0123456789
mkdir -p "$OUT"
rm -f "$OUT"/*.json

cargo build --release -q

server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap stop_server EXIT

# A fresh server per run, so RSS figures start from the same place.
start_server() {
  stop_server
  env RUST_LOG=warn \
    AGENTWIRE__SERVER__BIND=127.0.0.1:$PORT \
    AGENTWIRE__API__KEYS=$KEY \
    AGENTWIRE__AGENT__STEP_DELAY_MS="${STEP_DELAY:-0}" \
    AGENTWIRE__LIMITS__MAX_CONNECTIONS=19800 \
    AGENTWIRE__LIMITS__MAX_SESSIONS_PER_USER=1000 \
    AGENTWIRE__LIMITS__MAX_OUTBOUND_BYTES="${OUTBOUND:-16777216}" \
    "$BIN" >"$OUT/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server did not start" >&2
  exit 1
}

# After the load generator has closed every session: the server's RSS each second for 30 s.
memory_after_close() {
  local samples=()
  for _ in $(seq 30); do
    sleep 1
    samples+=("$(awk '/VmRSS/ {print $2}' "/proc/$server_pid/status")")
  done
  (IFS=,; echo "{\"rss_kb_each_second\": [${samples[*]}]}") >"$1"
}

# run NAME ARGS...: one scenario, REPS times, each against a fresh server.
run() {
  local name=$1
  shift
  for rep in $(seq "$REPS"); do
    start_server
    echo "== $name (run $rep of $REPS)"
    "$BIN" loadtest --url "ws://127.0.0.1:$PORT/ws" --api-key "$KEY" --quiet \
      --server-pid "$server_pid" --json "$OUT/$name.$rep.json" "$@" | tail -n +2
    if [ -n "${MEASURE_RETURN:-}" ]; then memory_after_close "$OUT/$name.$rep.return.json"; fi
  done
  echo "$name|$*" >>"$OUT/commands.txt"
}

rm -f "$OUT/commands.txt"
run idle-10k --scenario idle --sessions 10000 --users 1000 --hold-secs 2 --connect-concurrency 1000
MEASURE_RETURN=1 run idle-19k --scenario idle --sessions 19000 --users 2000 --hold-secs 2 --connect-concurrency 1000 --src-ips 127.0.0.1-127.0.0.20
run fanout-1x1000 --scenario fanout --sessions 1000 --users 1 --events 2000 --batch 100
run fanout-10000x1 --scenario fanout --sessions 10000 --users 10000 --events 200 --batch 50 --connect-concurrency 1000
run paced-1x1000 --scenario fanout --sessions 1000 --users 1 --events 500 --batch 1 --publish-rate 50
run chat-10000 --scenario chat --sessions 10000 --users 2500 --messages 5 --connect-concurrency 1000
# Hostile clients: the demo agent at its real pace (120 ms a step), so a run takes about 1 s; the
# same real users unloaded, against 1,000 never-authenticating senders of 60 KB frames, and
# against a mix of every attack. 20 source addresses, as the per-address cap is 100.
HOSTILE=(--sessions 100 --users 25 --messages 3 --src-ips 127.0.0.1-127.0.0.20)
# The default outbound budget (1 MiB), so slow readers meet the limit they would in production.
export STEP_DELAY=120 OUTBOUND=1048576
run hostile-baseline --scenario chat "${HOSTILE[@]}"
run hostile-unauth-1000 --scenario hostile "${HOSTILE[@]}" --attack unauth-senders=1000
run hostile-mix --scenario hostile "${HOSTILE[@]}"
unset STEP_DELAY OUTBOUND
stop_server

python3 benches/summarize.py "$OUT" "$REPS" >BENCHMARKS.md
echo "wrote BENCHMARKS.md"
