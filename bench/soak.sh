#!/usr/bin/env bash
# Soak: the task-queue, health and ticket services (release builds, as
# processes) under a steady load at half their measured peak for a set
# time, on a database, subject prefix and stream of its own on the local
# PostgreSQL and NATS (DATABASE_URL / NATS_URL elsewhere); samples each
# process's RSS and descriptors, the database connections, the outbox
# backlog, the tasks table and the events stream every 10 s, prints the
# table and a verdict, and exits non-zero when anything grew or failed.
#
#   bash bench/soak.sh [--minutes 10] [--rate TASKS_PER_S] [--sample-seconds 10]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=../deploy/local/services.sh
. deploy/local/services.sh
if [ -z "${DATABASE_URL:-}" ]; then ensure_postgres; else export OMOI_TEST_DATABASE_URL="$DATABASE_URL"; fi
# A current nats-server unless told (deploy/local/services.sh).
if [ -z "${NATS_URL:-}" ]; then ensure_current_nats; NATS_URL="$OMOI_CURRENT_NATS_URL"; fi
export OMOI_TEST_NATS_URL="$NATS_URL"
cargo build --release --locked -q -p omoi-task-queue -p omoi-health -p omoi-ticket -p omoi-bench --bins
exec target/release/omoi-soak "$@"
