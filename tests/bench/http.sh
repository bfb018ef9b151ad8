#!/usr/bin/env bash
# POST /v1/check under wrk against the physical ceiling, side by side in one run.
#
#   tests/bench/http.sh                  # 3 rounds of 10 s each, 2 threads, 64 connections
#   BENCH_DURATION=30s BENCH_RUNS=5 BENCH_CONNECTIONS=128 tests/bench/http.sh
#
# The ceiling is edge-agent's `ceiling` example: the edge's own HTTP server (hyper, the same
# accept loop and runtime) answering a constant 200. The edge is the release binary linked to
# one regional (release, in-memory store) over QUIC on loopback, with one rule of a limit no
# key reaches, so after its first request each key decides locally on its grant: what is
# measured is the HTTP path plus a local decision. Both get the same wrk script (the same
# keys, cycled), threads and connections; the rounds alternate ceiling, edge, ceiling, ...
# so that drift on a noisy machine hits both. Medians of the rounds, and their ratio.
#
# wrk is installed with apt-get when absent (as root, or with sudo).
set -euo pipefail
# `-e` inside $(...) too: a wrk that fails in a round stops the run.
shopt -s inherit_errexit
cd "$(dirname "$0")/../.."

duration="${BENCH_DURATION:-10s}"
threads="${BENCH_THREADS:-2}"
connections="${BENCH_CONNECTIONS:-64}"
runs="${BENCH_RUNS:-3}"
keys="${BENCH_KEYS:-1000}"
edge_port="${BENCH_EDGE_PORT:-18080}"
ceiling_port="${BENCH_CEILING_PORT:-18090}"
quic_port="${BENCH_QUIC_PORT:-17401}"
metrics_port="${BENCH_METRICS_PORT:-19401}"

if ! command -v wrk >/dev/null; then
  echo "==> installing wrk"
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    if ! command -v sudo >/dev/null; then
      echo "tests/bench/http.sh: wrk is not installed, and installing it needs root" >&2
      exit 1
    fi
    sudo=sudo
  fi
  $sudo apt-get update -qq && $sudo apt-get install -y -qq wrk >/dev/null
fi

echo "==> building (release)"
cargo build --release --locked -p edge-agent --bin edge-agent --example ceiling \
  -p regional-aggregator --bin regional-aggregator
bin=target/release

dir="$(mktemp -d "${TMPDIR:-/tmp}/rate-limiter-bench.XXXXXX")"
mkdir -p "$dir/logs"
pids=()
stop() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start, wait_http, refuse_busy.
prog=tests/bench/http.sh
# shellcheck source=deploy/lib.sh
source deploy/lib.sh
refuse_busy "set BENCH_*_PORT" "$edge_port" "$ceiling_port" "$metrics_port"

"$bin/regional-aggregator" pki --dir "$dir/pki" --node regional-eu-1 --node edge-eu-1 \
  --san localhost --san 127.0.0.1 >/dev/null
cat >"$dir/rules.yaml" <<YAML
version: 1
rate_limits:
  endpoints:
    - { id: search, path: /api/search, limit: 1000000000, window: 1h, key: user_id }
YAML
cat >"$dir/regional.yaml" <<YAML
node: regional-eu-1
region: eu
listen: 127.0.0.1:$quic_port
metrics: 127.0.0.1:$metrics_port
rules: rules.yaml
tls: { ca: pki/ca.pem, cert: pki/regional-eu-1.pem, key: pki/regional-eu-1.key }
YAML
cat >"$dir/edge.yaml" <<YAML
node: edge-eu-1
region: eu
listen: 127.0.0.1:$edge_port
rules: rules.yaml
regional: { addresses: ["127.0.0.1:$quic_port"], name: regional-eu-1 }
tls: { ca: pki/ca.pem, cert: pki/edge-eu-1.pem, key: pki/edge-eu-1.key }
YAML
cat >"$dir/check.lua" <<LUA
-- POST /v1/check for user u0 .. u$((keys - 1)), cycled.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local i = 0
request = function()
  i = (i + 1) % $keys
  return wrk.format(nil, "/v1/check", nil, '{"path":"/api/search","user_id":"u' .. i .. '"}')
end
LUA

start regional "$bin/regional-aggregator" --config "$dir/regional.yaml" --log warn
start edge "$bin/edge-agent" --config "$dir/edge.yaml" --log warn
start ceiling "$bin/examples/ceiling" "127.0.0.1:$ceiling_port"
wait_http "$edge_port" /readyz edge "is not connected to its regional"
wait_http "$ceiling_port" /healthz ceiling "is not answering"

# One wrk round against port $2; prints "req/s p50_ms p99_ms".
round() { # name, port
  local out
  out="$(wrk --latency -t"$threads" -c"$connections" -d"$duration" -s "$dir/check.lua" \
    "http://127.0.0.1:$2/v1/check")"
  echo "$out" >"$dir/logs/wrk-$1-$(date +%s%N).log"
  if echo "$out" | grep -q "Non-2xx\|Socket errors"; then
    echo "tests/bench/http.sh: $1 answered something other than 2xx, or sockets failed:" >&2
    echo "$out" >&2
    exit 1
  fi
  echo "$out" | awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    /Requests\/sec:/ { rps = $2 }
    $1 == "50%" { p50 = ms($2) }
    $1 == "99%" { p99 = ms($2) }
    END { if (rps == "") exit 1; printf "%.0f %.3f %.3f\n", rps, p50, p99 }'
}

# Warm up: every key's first request goes to the regional.
wrk -t1 -c4 -d2s -s "$dir/check.lua" "http://127.0.0.1:$edge_port/v1/check" >/dev/null

printf '\n==> %s rounds of %s, %s threads, %s connections, %s keys\n' \
  "$runs" "$duration" "$threads" "$connections" "$keys"
printf '%-8s %-6s %12s %10s %10s\n' server round "req/s" "p50 ms" "p99 ms"
: >"$dir/ceiling.txt"
: >"$dir/edge.txt"
for r in $(seq 1 "$runs"); do
  for name in ceiling edge; do
    port="$ceiling_port"
    if [ "$name" = edge ]; then port="$edge_port"; fi
    line="$(round "$name" "$port")"
    echo "$line" >>"$dir/$name.txt"
    read -r rps p50 p99 <<<"$line"
    printf '%-8s %-6s %12s %10s %10s\n' "$name" "$r" "$rps" "$p50" "$p99"
  done
done

median() { # file, column
  sort -n -k"$2","$2" "$1" | awk -v c="$2" '{ v[NR] = $c } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
ceiling_rps="$(median "$dir/ceiling.txt" 1)"
edge_rps="$(median "$dir/edge.txt" 1)"
local_ratio="$(exec 3<>"/dev/tcp/127.0.0.1/$edge_port"; printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3; awk '$1 == "edge_local_decision_ratio" { print $2 }' <&3)"
printf '\n==> medians\n'
printf '%-8s %12s %10s %10s\n' server "req/s" "p50 ms" "p99 ms"
printf '%-8s %12s %10s %10s\n' ceiling "$ceiling_rps" "$(median "$dir/ceiling.txt" 2)" "$(median "$dir/ceiling.txt" 3)"
printf '%-8s %12s %10s %10s\n' edge "$edge_rps" "$(median "$dir/edge.txt" 2)" "$(median "$dir/edge.txt" 3)"
awk -v e="$edge_rps" -v c="$ceiling_rps" 'BEGIN { printf "edge / ceiling: %.2f (target >= 0.80)\n", e / c }'
echo "edge local-decision ratio: $local_ratio"
echo "wrk outputs and logs: $dir"
