#!/usr/bin/env bash
# Runs omoi locally: builds the release binaries, then `omoi up` starts the
# task-queue, health and ticket services and two executors running the
# bundled demo agent on the machine's PostgreSQL and NATS (or on private ones
# it starts under OMOI_STATE_DIR when those are not there or not usable), files
# a sample ticket and follows it to the end, then keeps the mesh up for grpcurl
# until Ctrl-C. DATABASE_URL and NATS_URL override the local defaults. Extra
# arguments go to `omoi up` (e.g. --exit-when-done, or --runner claude-code
# with ANTHROPIC_API_KEY set to have Claude Code do the work; the pinned agent
# CLIs are installed then).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=services.sh
. deploy/local/services.sh
ensure_bubblewrap
# A current nats-server (2.14 or later) unless told otherwise: the
# machine's at 127.0.0.1:4222 when it is that new, else the pinned one
# beside it (deploy/local/services.sh); with nothing at 4222, `omoi up`
# starts its private NATS from the pinned binary.
if [ -z "${NATS_URL:-}" ]; then
    if nats_up; then
        ensure_current_nats
        if [ "$OMOI_CURRENT_NATS_URL" != nats://127.0.0.1:4222 ]; then export NATS_URL="$OMOI_CURRENT_NATS_URL"; fi
    else
        OMOI_NATS_SERVER=$(pinned_nats_server)
        export OMOI_NATS_SERVER
    fi
fi
case " $* " in
    *" --runner claude-code "* | *" --runner codex "* | *" --runner gemini "* | *--runner=claude-code* | *--runner=codex* | *--runner=gemini*)
        ensure_agent_clis ;;
esac
cargo build --release --bins
exec target/release/omoi up "$@"
