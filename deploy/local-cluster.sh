#!/usr/bin/env bash
# A rehearsal of a real deployment on one machine: a Ray head, two Ray worker nodes and an
# external, password-protected Redis, all as separate processes, with token auth on.
#
#   deploy/local-cluster.sh up      start them; prints the addresses and writes them to $DIR/env
#   deploy/local-cluster.sh down    stop exactly what `up` started (never a machine-wide `ray stop`)
#   deploy/local-cluster.sh env     print the env file (source it: `eval "$(deploy/local-cluster.sh env)"`)
#
# Then the same commands as on a real cluster:
#   prefixcache start  --address "$RAY_ADDRESS" --redis-url "$PREFIXCACHE_REDIS_URL" --workers 2
#   prefixcache submit requests.jsonl --address "$PREFIXCACHE_CLIENT" --out results.jsonl
#   prefixcache submit requests.jsonl --jobs "$PREFIXCACHE_JOBS" --out results.jsonl
#   prefixcache dashboard --redis-url "$PREFIXCACHE_REDIS_URL"
#   prefixcache stop   --address "$RAY_ADDRESS"
#
# Settings (environment): PREFIXCACHE_LOCAL_DIR (state, default /tmp/prefixcache-local),
# WORKER_NODES (2), CPUS_PER_NODE (2).
set -euo pipefail

DIR=${PREFIXCACHE_LOCAL_DIR:-/tmp/prefixcache-local}
WORKER_NODES=${WORKER_NODES:-2}
CPUS_PER_NODE=${CPUS_PER_NODE:-2}
HERE=$(cd "$(dirname "$0")/.." && pwd)
if [ -x "$HERE/.venv/bin/ray" ]; then PATH="$HERE/.venv/bin:$PATH"; fi
PY=$(command -v python3 || command -v python)
[ -x "$HERE/.venv/bin/python" ] && PY="$HERE/.venv/bin/python"
export RAY_AUTH_MODE=token  # every node and client of this cluster must say so
export RAY_raylet_start_wait_time_s=${RAY_raylet_start_wait_time_s:-120}  # slow, busy machines

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Each node's agents get ports of their own, so this cluster can run beside another Ray on the
# same machine (Ray's defaults, e.g. 52365 for the dashboard agent, would collide).
agent_ports() {
  echo "--dashboard-agent-listen-port $(free_port) --dashboard-agent-grpc-port $(free_port)" \
       "--metrics-export-port $(free_port) --runtime-env-agent-port $(free_port)"
}

say() { echo "[$SECONDS s] $*" >&2; }  # progress on stderr: where a slow start spends its time

fail() {  # fail MESSAGE LOG...: the message, each log's tail, exit 1 (`down` still cleans up)
  echo "local cluster up failed: $1" >&2; shift
  for f in "$@"; do [ -f "$f" ] && { echo "--- $f (last 30 lines):" >&2; tail -n 30 "$f" >&2; }; done
  exit 1
}

# Until COMMAND succeeds, the process PID exits (returns 2) or SECONDS pass (returns 1). Each try
# is cut at 30 s: a Ray driver pointed at a GCS that is not listening can wait for minutes.
wait_for() {  # wait_for SECONDS PID COMMAND...
  local deadline=$((SECONDS + $1)) pid=$2; shift 2
  until timeout -k 5 30 "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || return 2
    [ $SECONDS -ge $deadline ] && return 1
    sleep 0.5
  done
}

# Probes for wait_for (programs, not shell functions, so that `timeout` can run them).
PORT_OPEN='import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 2).close()'
NODES_ALIVE='
import sys
import ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR", log_to_driver=False)
sys.exit(0 if sum(n["Alive"] for n in ray.nodes()) >= int(sys.argv[2]) else 1)'  # NODES_ALIVE GCS_PORT N

start_redis() {  # start_redis PORT PASSWORD
  local redis_bin
  redis_bin=$(command -v redis-server || "$PY" -c 'from cache_store.embedded import valkey_binary; print(valkey_binary())')
  cat > "$DIR/redis.conf" <<EOF
bind 127.0.0.1
port $1
requirepass $2
save ""
appendonly no
dir $DIR
logfile $DIR/redis.log
EOF
  "$redis_bin" "$DIR/redis.conf" > /dev/null 2>&1 & echo $! > "$DIR/redis.pid"
  wait_for 30 "$(cat "$DIR/redis.pid")" "$PY" -c "$PORT_OPEN" "$1" \
    || fail "Redis did not listen on port $1" "$DIR/redis.log"
}

# The head, on ports picked just before: another process can take one in between, and then the
# head exits at once. That case picks new ports (3 tries); a head that runs but never answers fails.
start_head() {  # sets gcs, client, dash
  local try pid rc
  for try in 1 2 3; do
    gcs=$(free_port); client=$(free_port); dash=$(free_port)
    # shellcheck disable=SC2046  # agent_ports prints separate words on purpose
    ray start --head --block --port "$gcs" --ray-client-server-port "$client" $(agent_ports) \
      --include-dashboard=true --dashboard-host 127.0.0.1 --dashboard-port "$dash" \
      --num-cpus 1 --temp-dir "$DIR/ray" > "$DIR/head.log" 2>&1 & echo $! > "$DIR/head.pid"
    pid=$(cat "$DIR/head.pid")
    rc=0
    { wait_for 60 "$pid" "$PY" -c "$PORT_OPEN" "$gcs" \
      && wait_for 120 "$pid" "$PY" -c "$NODES_ALIVE" "$gcs" 1; } || rc=$?
    [ $rc -eq 0 ] && return 0
    [ $rc -eq 1 ] && fail "the Ray head did not register within 180 s" "$DIR/head.log"
    say "the Ray head exited while starting (try $try of 3); picking new ports"
    cp "$DIR/head.log" "$DIR/head-try$try.log"
  done
  fail "the Ray head exited while starting, 3 times" "$DIR/head.log"
}

join_worker() {  # join_worker I: worker node I, new agent ports if it exits at once (3 tries)
  local try pid rc
  for try in 1 2 3; do
    # shellcheck disable=SC2046
    ray start --address "127.0.0.1:$gcs" --block --num-cpus "$CPUS_PER_NODE" $(agent_ports) \
      > "$DIR/worker$1.log" 2>&1 & echo $! > "$DIR/worker$1.pid"
    pid=$(cat "$DIR/worker$1.pid")
    rc=0; wait_for 120 "$pid" "$PY" -c "$NODES_ALIVE" "$gcs" $(($1 + 1)) || rc=$?
    [ $rc -eq 0 ] && return 0
    [ $rc -eq 1 ] && fail "worker node $1 did not join within 120 s" "$DIR/worker$1.log" "$DIR/head.log"
    say "worker node $1 exited while starting (try $try of 3); picking new ports"
    cp "$DIR/worker$1.log" "$DIR/worker$1-try$try.log"
  done
  fail "worker node $1 exited while starting, 3 times" "$DIR/worker$1.log"
}

up() {
  if [ -f "$DIR/env" ]; then echo "already up (state in $DIR); run '$0 down' first" >&2; exit 1; fi
  mkdir -p "$DIR"
  # the token every node and client will present
  timeout -k 5 60 ray get-auth-token --generate >/dev/null || fail "ray get-auth-token --generate failed or hung"
  local redis_port password i gcs client dash
  redis_port=$(free_port)
  password=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(18))')
  start_redis "$redis_port" "$password"
  say "Redis up"
  start_head
  say "Ray head up"
  # Join worker nodes one at a time, each after the cluster has registered the previous one:
  # on a small machine a burst of joins can time out while the head is still starting.
  for i in $(seq 1 "$WORKER_NODES"); do join_worker "$i"; say "worker node $i joined"; done
  # the Jobs API answers (JobSubmissionClient presents the auth token)
  wait_for 60 "$(cat "$DIR/head.pid")" "$PY" -c \
    "from ray.job_submission import JobSubmissionClient as C; C('http://127.0.0.1:$dash').get_version()" \
    || fail "the Jobs API did not answer on port $dash" "$DIR/head.log"
  cat > "$DIR/env" <<EOF
export RAY_AUTH_MODE=token
export RAY_ADDRESS=127.0.0.1:$gcs
export PREFIXCACHE_CLIENT=ray://127.0.0.1:$client
export PREFIXCACHE_JOBS=http://127.0.0.1:$dash
export PREFIXCACHE_REDIS_URL=redis://:$password@127.0.0.1:$redis_port/0
EOF
  echo "local cluster up: head + $WORKER_NODES worker nodes, Redis on 127.0.0.1:$redis_port"
  sed 's/^export /  /; s/:[^:@\/]*@/:***@/' "$DIR/env"
}

down() {
  [ -d "$DIR" ] || { echo "nothing to stop ($DIR does not exist)"; return 0; }
  local pids=()
  for f in "$DIR"/worker*.pid "$DIR/head.pid" "$DIR/redis.pid"; do
    [ -f "$f" ] && pids+=("$(cat "$f")")
  done
  # `ray start --block` stops the processes it started when it gets SIGTERM.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 60); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ $alive -eq 0 ] && break
    sleep 0.5
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "$DIR"
  echo "local cluster down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) cat "$DIR/env" ;;
  *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
