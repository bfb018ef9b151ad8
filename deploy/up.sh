#!/usr/bin/env bash
# Starts a whole local topology on loopback (DESIGN §10): a coordinator, two regions of one
# aggregator each, two edge agents per region; Redis when redis-server is installed, the
# in-memory store otherwise.
#
# Not yet: the tiers' binaries are still empty crates (see README.md, "What runs today").
# This script refuses rather than pretend; it will start them once they exist.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "deploy/up.sh: nothing to start yet." >&2
echo "  The edge agent, regional aggregator and global coordinator are not built;" >&2
echo "  see README.md, 'What runs today'. tests/run.sh runs what exists." >&2
exit 1
