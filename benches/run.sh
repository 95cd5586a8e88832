#!/usr/bin/env bash
# The benchmark suite: builds release, runs the standard scenarios against a fresh server on
# 127.0.0.1 (server and load generator share this machine), repeats each, and writes
# BENCHMARKS.md with the medians. Usage: benches/run.sh [repetitions, default 3]
# ONLY=core|hostile|agents|scale|raw|store|chaos|auth runs one group of scenarios (the other groups' reports from
# an earlier run are kept, so BENCHMARKS.md keeps them too).
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
# One group alone (ONLY=...) keeps the other groups' reports, so BENCHMARKS.md keeps them too.
[ -n "${ONLY:-}" ] || rm -f "$OUT"/*.json

cargo build --release -q
cargo build --release -q --example bench_agent
AGENT_PORT=18090
want() { [ -z "${ONLY:-}" ] || [ "$ONLY" = "$1" ]; }

server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
  fi
}
trap stop_server EXIT

# A fresh server per run, so RSS figures start from the same place, with a fresh SQLite store
# (the default store: docs/conversations.md).
start_server() {
  stop_server
  rm -f "$OUT"/bench.db*
  env RUST_LOG=warn \
    AGENTWIRE__STORE__KIND="${STORE_KIND:-sqlite}" AGENTWIRE__STORE__PATH="$OUT/bench.db" \
    AGENTWIRE__STORE__URL="${STORE_URL:-postgres://127.0.0.1:5432/agentwire}" \
    AGENTWIRE__SERVER__BIND=127.0.0.1:$PORT \
    AGENTWIRE__API__KEYS=$KEY \
    AGENTWIRE__AGENT__STEP_DELAY_MS="${STEP_DELAY:-0}" \
    AGENTWIRE__LIMITS__MAX_CONNECTIONS=19800 \
    AGENTWIRE__LIMITS__MAX_SESSIONS_PER_USER=1000 \
    AGENTWIRE__LIMITS__MAX_OUTBOUND_BYTES="${OUTBOUND:-16777216}" \
    AGENTWIRE__AGENT__KIND="${AGENT_KIND:-demo}" \
    AGENTWIRE__AGENT__URL="${AGENT_URL:-}" \
    AGENTWIRE__AGENT__MAX_CONCURRENT_RUNS=5000 \
    AGENTWIRE__SERVER__REGISTRY_SHARDS="${SHARDS:-0}" \
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

[ -n "${ONLY:-}" ] || rm -f "$OUT/commands.txt"
if want core; then
run idle-10k --scenario idle --sessions 10000 --users 1000 --hold-secs 2 --connect-concurrency 1000
MEASURE_RETURN=1 run idle-19k --scenario idle --sessions 19000 --users 2000 --hold-secs 2 --connect-concurrency 1000 --src-ips 127.0.0.1-127.0.0.20
run fanout-1x1000 --scenario fanout --sessions 1000 --users 1 --events 2000 --batch 100
run fanout-10000x1 --scenario fanout --sessions 10000 --users 10000 --events 200 --batch 50 --connect-concurrency 1000
run paced-1x1000 --scenario fanout --sessions 1000 --users 1 --events 500 --batch 1 --publish-rate 50
run chat-10000 --scenario chat --sessions 10000 --users 2500 --messages 5 --connect-concurrency 1000
fi
if want hostile; then
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
fi

# AG-UI agents (docs/agents.md): 1,000 sessions chat with an agent that answers at once, first
# alone, then while 1,000 other users' runs hold the same agent for 10 s each (examples/
# bench_agent.rs); the slow runs are all open before the measured chat starts and after it ends.
agent_pid=""
stop_agent() { if [ -n "$agent_pid" ]; then kill "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true; fi; }
open_slow_runs() { curl -sf "http://127.0.0.1:$AGENT_PORT/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["open_slow_runs"])'; }
if want agents; then
  target/release/examples/bench_agent --port $AGENT_PORT --slow-secs 10 >"$OUT/agent.log" 2>&1 &
  agent_pid=$!
  trap 'stop_server; stop_agent' EXIT
  export AGENT_KIND=ag-ui AGENT_URL="http://127.0.0.1:$AGENT_PORT/"
  CHAT=(--scenario chat --sessions 1000 --users 250 --messages 5)
  run agents-unloaded "${CHAT[@]}"
  for rep in $(seq "$REPS"); do
    start_server
    echo "== agents-loaded (run $rep of $REPS)"
    "$BIN" loadtest --url "ws://127.0.0.1:$PORT/ws" --quiet --scenario chat --sessions 1000 --users 1000 \
      --messages 1 --message-text "take it slow" --json "$OUT/agents-slow.$rep.json" >/dev/null &
    slow_pid=$!
    for _ in $(seq 300); do
      [ "$(open_slow_runs)" = 1000 ] && break
      sleep 0.1
    done
    before=$(open_slow_runs)
    "$BIN" loadtest --url "ws://127.0.0.1:$PORT/ws" --quiet --server-pid "$server_pid" \
      --json "$OUT/agents-loaded.$rep.json" "${CHAT[@]}" | tail -n +2
    echo "{\"open_slow_runs_before\": $before, \"open_slow_runs_after\": $(open_slow_runs)}" >"$OUT/agents-open.$rep.json"
    wait "$slow_pid"
  done
  echo "agents-loaded|${CHAT[*]} (while: --sessions 1000 --users 1000 --messages 1 --message-text 'take it slow')" >>"$OUT/commands.txt"
  # A verbose agent (docs/agents.md, v2): ten runs at once, each 3,000 text events of 30 KB
  # (bench_agent's "verbose"), read as fast as they come; the server's peak RSS (VmHWM) and its
  # RSS each second for 30 s after.
  VERBOSE=(--scenario chat --sessions 10 --users 10 --messages 1 --message-text "be verbose" --scenario-timeout-secs 300)
  for rep in $(seq "$REPS"); do
    start_server
    echo "== agents-verbose (run $rep of $REPS)"
    "$BIN" loadtest --url "ws://127.0.0.1:$PORT/ws" --quiet --server-pid "$server_pid" \
      --json "$OUT/agents-verbose.$rep.json" "${VERBOSE[@]}" | tail -n +2
    echo "{\"peak_rss_kb\": $(awk '/VmHWM/ {print $2}' "/proc/$server_pid/status")}" >"$OUT/agents-verbose-peak.$rep.json"
    memory_after_close "$OUT/agents-verbose-after.$rep.json"
  done
  echo "agents-verbose|--scenario chat --sessions 10 --users 10 --messages 1 --message-text 'be verbose' --scenario-timeout-secs 300" >>"$OUT/commands.txt"
  unset AGENT_KIND AGENT_URL
  stop_agent
fi
# Scale-out (docs/scale-out.md): the same fan-out with the users' streams in Redis and the
# sessions spread over 2 and 3 nodes, against one node with the memory broker in the same run.
# Redis commands per event from Redis's own counter.
# Several nodes keep conversations in one PostgreSQL database: a fresh one per run, dropped after.
node_pids=()
bench_db=""
PG=${BENCH_POSTGRES:-postgres://127.0.0.1:5432}
drop_db() { if [ -n "$bench_db" ]; then psql "$PG/postgres" -qc "DROP DATABASE IF EXISTS $bench_db WITH (FORCE)" >/dev/null; bench_db=""; fi; }
stop_nodes() { for pid in "${node_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done; node_pids=(); drop_db; }
start_nodes() {
  local count=$1 prefix="bench-$RANDOM-$RANDOM"
  stop_nodes
  bench_db="agentwire_bench_${RANDOM}_$RANDOM"
  psql "$PG/postgres" -qc "CREATE DATABASE $bench_db" >/dev/null
  NODE_URLS=()
  for i in $(seq 0 $((count - 1))); do
    env RUST_LOG=warn AGENTWIRE__SERVER__BIND=127.0.0.1:$((PORT + 10 + i)) AGENTWIRE__API__KEYS=$KEY \
      AGENTWIRE__AGENT__STEP_DELAY_MS=0 AGENTWIRE__LIMITS__MAX_CONNECTIONS=19800 \
      AGENTWIRE__LIMITS__MAX_SESSIONS_PER_USER=1000 AGENTWIRE__LIMITS__MAX_OUTBOUND_BYTES=16777216 \
      AGENTWIRE__BROKER__KIND=redis AGENTWIRE__BROKER__PREFIX="$prefix" AGENTWIRE__BROKER__NODE_ID="node-$i" \
      AGENTWIRE__STORE__KIND=postgres AGENTWIRE__STORE__URL="$PG/$bench_db" \
      "$BIN" >"$OUT/node-$i.log" 2>&1 &
    node_pids+=($!)
    NODE_URLS+=(--url "ws://127.0.0.1:$((PORT + 10 + i))/ws")
  done
  for i in $(seq 0 $((count - 1))); do
    for _ in $(seq 100); do
      curl -sf "http://127.0.0.1:$((PORT + 10 + i))/readyz" >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
}
redis_commands() { redis-cli -h 127.0.0.1 -p 6379 info stats | awk -F: '/total_commands_processed/ {print $2+0}'; }
# run_nodes NAME COUNT ARGS...: one scenario over COUNT Redis nodes, REPS times.
run_nodes() {
  local name=$1 count=$2
  shift 2
  for rep in $(seq "$REPS"); do
    start_nodes "$count"
    echo "== $name (run $rep of $REPS)"
    local before after
    before=$(redis_commands)
    "$BIN" loadtest "${NODE_URLS[@]}" --api-key "$KEY" --quiet --json "$OUT/$name.$rep.json" "$@" | tail -n +2
    after=$(redis_commands)
    echo "{\"redis_commands\": $((after - before))}" >"$OUT/$name-redis.$rep.json"
  done
  echo "$name|$* (over $count nodes on one Redis)" >>"$OUT/commands.txt"
  stop_nodes
}
# The raw baseline (benches/raw_ws.rs, issue 14): the same fan-out and idle load against a bare
# tokio-tungstenite broadcast server and against agentwire, one after the other in the same run.
raw_pid=""
stop_raw() { if [ -n "$raw_pid" ]; then kill "$raw_pid" 2>/dev/null || true; wait "$raw_pid" 2>/dev/null || true; raw_pid=""; fi; }
# run_raw NAME ARGS...: one scenario against a fresh raw server, REPS times.
run_raw() {
  local name=$1
  shift
  for rep in $(seq "$REPS"); do
    stop_raw
    target/release/examples/raw_ws $((PORT + 30)) >"$OUT/raw.log" 2>&1 &
    raw_pid=$!
    for _ in $(seq 100); do
      (echo > /dev/tcp/127.0.0.1/$((PORT + 30))) 2>/dev/null && break
      sleep 0.1
    done
    echo "== $name (run $rep of $REPS)"
    "$BIN" loadtest --url "ws://127.0.0.1:$((PORT + 30))/ws" --api-key "$KEY" --quiet \
      --server-pid "$raw_pid" --json "$OUT/$name.$rep.json" "$@" | tail -n +2
  done
  echo "$name|$* (against benches/raw_ws.rs)" >>"$OUT/commands.txt"
  stop_raw
}
# The raw baseline and agentwire take each load one after the other, so their ratios come from
# one moment of this shared machine; then the registry on its default shards against one per core.
if want raw; then
  cargo build --release -q --example raw_ws
  trap 'stop_server; stop_raw' EXIT
  RAW_FAN=(--scenario fanout --sessions 1000 --users 1 --events 2000 --batch 10)
  RAW_PACED=(--scenario fanout --sessions 1000 --users 1 --events 500 --batch 1 --publish-rate 50)
  RAW_IDLE=(--scenario idle --sessions 19000 --users 2000 --hold-secs 2 --connect-concurrency 1000 --src-ips 127.0.0.1-127.0.0.20)
  MANY=(--scenario fanout --sessions 10000 --users 1000 --events 100 --batch 10 --connect-concurrency 1000)
  run raw-agentwire-fanout "${RAW_FAN[@]}"
  run_raw raw-baseline-fanout "${RAW_FAN[@]}"
  run raw-agentwire-paced "${RAW_PACED[@]}"
  run_raw raw-baseline-paced "${RAW_PACED[@]}"
  run raw-agentwire-idle "${RAW_IDLE[@]}"
  run_raw raw-baseline-idle "${RAW_IDLE[@]}"
  run shards-default-many "${MANY[@]}"
  SHARDS=$(nproc) run shards-percore-many "${MANY[@]}"
  SHARDS=$(nproc) run shards-percore-idle "${RAW_IDLE[@]}"
fi
if want scale; then
  trap 'stop_server; stop_nodes' EXIT
  SCALE1=(--scenario fanout --sessions 1000 --users 1 --events 2000 --batch 100)
  SCALE2=(--scenario fanout --sessions 10000 --users 1000 --events 100 --batch 10 --connect-concurrency 1000)
  run scale-memory-1x1000 "${SCALE1[@]}"
  run_nodes scale-redis-1x1000 2 "${SCALE1[@]}"
  run scale-memory-1000x10 "${SCALE2[@]}"
  run_nodes scale-redis-1000x10 3 "${SCALE2[@]}"
fi
# The randomized fault run (docs/scale-out.md, tests/chaos.rs): ten minutes of faults drawn at
# random over three nodes on a Redis of its own while users chat and a backend publishes; its
# counts (faults, events checked, violations) go to the report.
if want chaos; then
  AGENTWIRE_CHAOS_SECS=${CHAOS_SECS:-600} cargo test --release -q --test chaos -- --nocapture 2>&1 \
    | grep '^chaos:' | tee "$OUT/chaos.txt"
fi
# Identity providers (docs/protocol.md section 2): a token's cost per algorithm with a provider's
# key set against the secret and a key file, and a flood of made-up kids against one provider.
if want auth; then
  cargo build --release -q --example auth_verify
  target/release/examples/auth_verify 2000 | tee "$OUT/auth.json"
fi
# The conversation store (docs/conversations.md): the same chat with conversations in memory, in
# SQLite (the default) and in PostgreSQL, one after the other in one run; the store's size after.
if want store; then
  trap 'stop_server; stop_nodes' EXIT
  STORE_CHAT=(--scenario chat --sessions 1000 --users 250 --messages 5)
  STORE_KIND=memory run store-memory "${STORE_CHAT[@]}"
  for rep in $(seq "$REPS"); do
    start_server
    echo "== store-sqlite (run $rep of $REPS)"
    "$BIN" loadtest --url "ws://127.0.0.1:$PORT/ws" --quiet --server-pid "$server_pid" \
      --json "$OUT/store-sqlite.$rep.json" "${STORE_CHAT[@]}" | tail -n +2
    stop_server
    echo "{\"store_bytes\": $(cat "$OUT"/bench.db* | wc -c)}" >"$OUT/store-sqlite-size.$rep.json"
  done
  echo "store-sqlite|${STORE_CHAT[*]}" >>"$OUT/commands.txt"
  for rep in $(seq "$REPS"); do
    bench_db="agentwire_bench_${RANDOM}_$RANDOM"
    psql "$PG/postgres" -qc "CREATE DATABASE $bench_db" >/dev/null
    STORE_KIND=postgres STORE_URL="$PG/$bench_db" start_server
    empty=$(psql "$PG/postgres" -tAc "SELECT pg_database_size('$bench_db')")
    echo "== store-postgres (run $rep of $REPS)"
    "$BIN" loadtest --url "ws://127.0.0.1:$PORT/ws" --quiet --server-pid "$server_pid" \
      --json "$OUT/store-postgres.$rep.json" "${STORE_CHAT[@]}" | tail -n +2
    stop_server
    full=$(psql "$PG/postgres" -tAc "SELECT pg_database_size('$bench_db')")
    echo "{\"store_bytes\": $((full - empty))}" >"$OUT/store-postgres-size.$rep.json"
    drop_db
  done
  echo "store-postgres|${STORE_CHAT[*]}" >>"$OUT/commands.txt"
fi
stop_server

python3 benches/summarize.py "$OUT" "$REPS" >"${BENCH_OUT:-BENCHMARKS.md}"
echo "wrote ${BENCH_OUT:-BENCHMARKS.md}"
