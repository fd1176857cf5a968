#!/usr/bin/env bash
# Runs omoi locally on this machine's PostgreSQL and NATS (started if need
# be): builds the release binaries, then drives a task-queue with simulated
# agents and prints what it measured. DATABASE_URL and NATS_URL override the
# local defaults (database `omoi`, created when missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=services.sh
. deploy/local/services.sh
ensure_postgres
ensure_nats
cargo build --release --bins
exec target/release/omoi-bench --spawn "${@:---tasks=5000}"
