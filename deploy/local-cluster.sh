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

wait_for() {  # wait_for SECONDS COMMAND...
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then echo "timed out waiting for: $*" >&2; return 1; fi
    sleep 0.5
  done
}

nodes_alive() {  # nodes_alive GCS_PORT N: at least N live nodes
  "$PY" - "$1" "$2" <<'EOF'
import sys
import ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR", log_to_driver=False)
sys.exit(0 if sum(n["Alive"] for n in ray.nodes()) >= int(sys.argv[2]) else 1)
EOF
}

up() {
  if [ -f "$DIR/env" ]; then echo "already up (state in $DIR); run '$0 down' first" >&2; exit 1; fi
  mkdir -p "$DIR"
  ray get-auth-token --generate >/dev/null  # the token every node and client will present
  local gcs client dash redis_port password redis_bin
  gcs=$(free_port); client=$(free_port); dash=$(free_port); redis_port=$(free_port)
  password=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(18))')

  redis_bin=$(command -v redis-server || "$PY" -c 'from cache_store.embedded import valkey_binary; print(valkey_binary())')
  cat > "$DIR/redis.conf" <<EOF
bind 127.0.0.1
port $redis_port
requirepass $password
save ""
appendonly no
dir $DIR
logfile $DIR/redis.log
EOF
  "$redis_bin" "$DIR/redis.conf" > /dev/null 2>&1 & echo $! > "$DIR/redis.pid"

  # shellcheck disable=SC2046  # agent_ports prints separate words on purpose
  ray start --head --block --port "$gcs" --ray-client-server-port "$client" $(agent_ports) \
    --include-dashboard=true --dashboard-host 127.0.0.1 --dashboard-port "$dash" \
    --num-cpus 1 --temp-dir "$DIR/ray" > "$DIR/head.log" 2>&1 & echo $! > "$DIR/head.pid"
  # Join worker nodes one at a time, each after the cluster has registered the previous one:
  # on a small machine a burst of joins can time out while the head is still starting.
  for i in $(seq 0 "$WORKER_NODES"); do
    if [ "$i" -gt 0 ]; then
      # shellcheck disable=SC2046
      ray start --address "127.0.0.1:$gcs" --block --num-cpus "$CPUS_PER_NODE" $(agent_ports) \
        > "$DIR/worker$i.log" 2>&1 & echo $! > "$DIR/worker$i.pid"
    fi
    wait_for 120 nodes_alive "$gcs" $((i + 1))
  done
  # the Jobs API answers (JobSubmissionClient presents the auth token)
  wait_for 60 "$PY" -c "from ray.job_submission import JobSubmissionClient as C; C('http://127.0.0.1:$dash').get_version()"
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
