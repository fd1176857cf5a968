#!/usr/bin/env bash
# The whole test suite: starts PostgreSQL and NATS if they are not running,
# then builds and runs every test of the workspace against them.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=../deploy/local/services.sh
. deploy/local/services.sh
ensure_postgres
ensure_nats
cargo build --workspace --bins
cargo test --workspace "$@"
