#!/usr/bin/env bash
# Starts a local topology on loopback (DESIGN §10): the global coordinator, and two regions,
# each one regional aggregator and two edge agents; one Redis per region when redis-server is
# installed, the regionals' in-memory store otherwise. Ctrl-C stops everything it started.
#
#   deploy/up.sh                 # build (release) and run
#   UP_PROFILE=debug deploy/up.sh    # use the debug build (faster to build; what the tests use)
#   UP_DIR=/tmp/rl deploy/up.sh      # where certificates, configs, data and logs go
#                                    # (default: a fresh temporary directory)
#   UP_NO_BUILD=1 deploy/up.sh       # use what is built (tests/run.sh builds it first)
#
# Ports: edges' HTTP on 127.0.0.1:8080-8083 (eu-1, eu-2, us-1, us-2), regionals' QUIC on
# 127.0.0.1:7401 (eu) and 7402 (us) and their metrics on 9401 and 9402, the coordinator's admin
# API on 127.0.0.1:9000 and its QUIC (for the regionals) on 7500, Redis on 127.0.0.1:6391 (eu)
# and 6392 (us). They are set in deploy/config/*.yaml; edit the copies there to move them.
#
# The coordinator owns the rules and splits every limit between the two regions; each regional
# reports its demand to it every second, and a region whose share of a key is spent asks it for
# the other region's unused quota before denying.
set -euo pipefail
cd "$(dirname "$0")/.."

profile="${UP_PROFILE:-release}"
case "$profile" in
  release) cargo_flags=(--release) ;;
  debug) cargo_flags=() ;;
  *) echo "deploy/up.sh: UP_PROFILE must be release or debug, not $profile" >&2; exit 2 ;;
esac

bin="${CARGO_TARGET_DIR:-target}/$profile"
if [ -z "${UP_NO_BUILD:-}" ]; then
  echo "==> building the coordinator, the regional aggregator and the edge agent ($profile)"
  # The whole workspace, as tests/run.sh builds it, so both share one build.
  cargo build "${cargo_flags[@]}" --locked --workspace --bins
fi
for b in edge-agent regional-aggregator global-coordinator; do
  if [ ! -x "$bin/$b" ]; then
    echo "deploy/up.sh: $bin/$b is not built; run without UP_NO_BUILD" >&2
    exit 1
  fi
done

dir="${UP_DIR:-$(mktemp -d -t rate-limiter-XXXXXX)}"
mkdir -p "$dir/logs"
rm -rf "$dir/config"
cp -r deploy/config "$dir/config"

pids=()
stop() {
  trap - INT TERM EXIT
  if [ "${#pids[@]}" -gt 0 ]; then
    echo
    echo "==> stopping ${#pids[@]} processes"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  echo "==> stopped; logs in $dir/logs"
  exit 0
}
trap stop INT TERM EXIT

# A throwaway CA and a certificate per node, valid for loopback.
echo "==> certificates in $dir/pki"
"$bin/regional-aggregator" pki --dir "$dir/pki" \
  --node coordinator-1 --node regional-eu-1 --node regional-us-1 \
  --node edge-eu-1 --node edge-eu-2 --node edge-us-1 --node edge-us-2 \
  --san localhost --san 127.0.0.1 >/dev/null

# start, wait_tcp, wait_http, refuse_busy.
prog=deploy/up.sh
# shellcheck source=deploy/lib.sh
source deploy/lib.sh

# Another topology (an earlier up.sh still running) would answer on our ports and be taken for
# ours: refuse to start beside it.
refuse_busy "another deploy/up.sh still running?; stop it first" \
  9000 8080 8081 8082 8083 9401 9402 6391 6392

# The admin token: fresh and random each run, readable only by us.
(umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$dir/admin.token")
rm -rf "$dir/state"
start coordinator "$bin/global-coordinator" --config "$dir/config/coordinator.yaml"
wait_tcp 9000 coordinator

declare -A redis_port=([eu]=6391 [us]=6392)
store="in-memory store (redis-server is not installed)"
if command -v redis-server >/dev/null 2>&1; then
  store="Redis"
  for region in eu us; do
    mkdir -p "$dir/redis-$region"
    start "redis-$region" redis-server --port "${redis_port[$region]}" --bind 127.0.0.1 \
      --dir "$dir/redis-$region" --save "" --appendonly no
    wait_tcp "${redis_port[$region]}" "redis-$region"
  done
fi

for region in eu us; do
  args=(--config "$dir/config/regional-$region.yaml")
  if [ "$store" = Redis ]; then args+=(--redis "redis://127.0.0.1:${redis_port[$region]}"); fi
  start "regional-$region" "$bin/regional-aggregator" "${args[@]}"
done

declare -A edge_port=([eu-1]=8080 [eu-2]=8081 [us-1]=8082 [us-2]=8083)
for edge in eu-1 eu-2 us-1 us-2; do
  start "edge-$edge" "$bin/edge-agent" --config "$dir/config/edge-$edge.yaml"
done
for edge in eu-1 eu-2 us-1 us-2; do
  wait_tcp "${edge_port[$edge]}" "edge-$edge"
  # Ready once connected to its regional; until then its rules' failure modes decide (a
  # `closed` login rule would answer 429).
  wait_http "${edge_port[$edge]}" /readyz "edge-$edge" "is not connected to its regional"
done

# Until both regionals are linked to the coordinator and have reported their edges: the
# status table below then shows the whole topology.
linked() {
  "$bin/global-coordinator" ctl --addr 127.0.0.1:9000 status 2>/dev/null |
    awk '$1 == "eu" || $1 == "us" { if ($3 == 1 && $4 == 2) n++ } END { exit n != 2 }'
}
export COORDINATOR_TOKEN
COORDINATOR_TOKEN="$(cat "$dir/admin.token")"
for _ in $(seq 1 100); do
  if linked; then break; fi
  sleep 0.1
done
if ! linked; then
  echo "deploy/up.sh: the regionals did not link to the coordinator; their logs:" >&2
  cat "$dir/logs/regional-eu.log" "$dir/logs/regional-us.log" >&2
  exit 1
fi

redis_eu="" redis_us=""
if [ "$store" = Redis ]; then
  redis_eu="   redis://127.0.0.1:6391" redis_us="   redis://127.0.0.1:6392"
fi
status="$("$bin/global-coordinator" ctl --addr 127.0.0.1:9000 status)"
cat <<EOF

==> up: a coordinator and two regions on loopback, counts in the $store
  edge-eu-1  http://127.0.0.1:8080   (POST /v1/check, GET /healthz, /readyz, /metrics)
  edge-eu-2  http://127.0.0.1:8081
  edge-us-1  http://127.0.0.1:8082
  edge-us-2  http://127.0.0.1:8083
  regional-eu-1  quic://127.0.0.1:7401   metrics http://127.0.0.1:9401/metrics$redis_eu
  regional-us-1  quic://127.0.0.1:7402   metrics http://127.0.0.1:9402/metrics$redis_us
  coordinator    http://127.0.0.1:9000   (admin API; token in $dir/admin.token)   quic://127.0.0.1:7500
  rules: $dir/config/rules.yaml    logs: $dir/logs/

$status

Operate it:  COORDINATOR_TOKEN=\$(cat $dir/admin.token) $bin/global-coordinator ctl status

Try it (the login rule allows 5 per minute per IP across both regions; the sixth is 429):

  curl -i -X POST http://127.0.0.1:8080/v1/check \\
    -d '{"path": "/api/login", "method": "POST", "ip": "203.0.113.7"}'

Ctrl-C stops everything.
EOF

# Until Ctrl-C, or until one of them dies (then say which, and stop the rest).
while true; do
  for pid in "${pids[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "deploy/up.sh: process $pid exited; see $dir/logs/" >&2
      exit 1
    fi
  done
  sleep 1
done
