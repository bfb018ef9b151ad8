#!/usr/bin/env bash
# Runs every test in the workspace, installing what is missing (DESIGN §10).
#
#   tests/run.sh                  # everything the normal suite runs
#   tests/run.sh -- --ignored stress   # the slow stress_* runs (extra args go to cargo test)
#
# Tests start their own servers (redis-server and others) on free loopback ports and stop
# them afterwards; nothing is assumed to be running.
set -euo pipefail
cd "$(dirname "$0")/.."

# redis-server: the regional's store tests and the cross-tier scenarios start real ones.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "tests/run.sh: redis-server not found; installing it with apt-get" >&2
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
fi

# Process-level tests find the built binaries next to the test executable.
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
