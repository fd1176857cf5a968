#!/usr/bin/env bash
# Runs omoi locally on this machine's PostgreSQL and NATS (started if need
# be): builds the release binaries, starts the task-queue, health and ticket
# services and two executors running the bundled demo agent, files a sample
# ticket and follows it to the end, then keeps the mesh up for grpcurl until
# Ctrl-C. DATABASE_URL and NATS_URL override the local defaults (database
# `omoi`, created when missing). Extra arguments go to `omoi up`
# (e.g. --exit-when-done, or --runner claude-code with ANTHROPIC_API_KEY set
# to have Claude Code do the work; the pinned agent CLIs are installed then).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=services.sh
. deploy/local/services.sh
ensure_postgres
ensure_nats
case " $* " in
    *" --runner claude-code "* | *" --runner codex "* | *" --runner gemini "* | *--runner=claude-code* | *--runner=codex* | *--runner=gemini*)
        ensure_agent_clis ;;
esac
cargo build --release --bins
exec target/release/omoi up "$@"
